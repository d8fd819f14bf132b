//! Janus as the peer under test (`chorus loadgen --target janus`): its WebSocket API as a client
//! (create a session, attach the streaming plugin, `watch` a mountpoint, `start` with our
//! answer), so that the same str0m viewers as against chorus watch one Janus mountpoint. Janus
//! sends the offer; the viewer answers with its one host candidate and no trickle.
//!
//! The API is JSON over one WebSocket per viewer (subprotocol `janus-protocol`), the way
//! janus.js uses it: every request carries a transaction; synchronous requests answer
//! `success` or `error`, plugin messages answer `ack` and then an `event` with the same
//! transaction (and the jsep). Janus ends a viewer's session when its socket closes, so the
//! socket is held (and read) for as long as the viewer lives, as chorus's signalling is.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How often a viewer's session is kept alive (janus.js: 25 s, against Janus's 60 s timeout).
const KEEPALIVE: Duration = Duration::from_secs(25);
/// The streaming plugin's package name, as `attach` wants it.
const STREAMING: &str = "janus.plugin.streaming";

/// What one message from Janus means for the request waiting on transaction `trans`.
#[derive(Debug, PartialEq)]
pub(crate) enum Reply {
    /// Not (yet) the answer: an `ack`, or a message of another transaction or none.
    NotYet,
    /// The answer: `success` (its `data`, or `plugindata.data`) or a plugin `event` (all of
    /// it: the jsep is beside the plugin data).
    Done(Value),
    /// Janus or the plugin refused, with its reason.
    Refused(String),
}

/// Classifies `v` for the request of transaction `trans`.
pub(crate) fn classify(v: &Value, trans: &str) -> Reply {
    if v["transaction"].as_str() != Some(trans) {
        return Reply::NotYet;
    }
    match v["janus"].as_str() {
        Some("ack") => Reply::NotYet,
        Some("error") => Reply::Refused(format!(
            "Janus error {}: {}",
            v["error"]["code"],
            v["error"]["reason"].as_str().unwrap_or("(no reason)")
        )),
        Some("success") | Some("event") => {
            let data = &v["plugindata"]["data"];
            if let Some(e) = data["error"].as_str() {
                return Reply::Refused(format!(
                    "streaming plugin error {}: {e}",
                    data["error_code"]
                ));
            }
            Reply::Done(v.clone())
        }
        _ => Reply::NotYet,
    }
}

/// The offer of a `watch` event: its SDP, checked to hold `streams` audio m-lines.
pub(crate) fn watch_offer(event: &Value, streams: usize) -> Result<String, String> {
    let jsep = &event["jsep"];
    if jsep["type"].as_str() != Some("offer") {
        return Err(format!("watch answered without an offer: {event}"));
    }
    let sdp = jsep["sdp"]
        .as_str()
        .ok_or_else(|| format!("watch offer without an SDP: {event}"))?;
    let audio = sdp.lines().filter(|l| l.starts_with("m=audio")).count();
    if audio != streams {
        return Err(format!(
            "the mountpoint offers {audio} audio streams, the run has --tracks {streams}: \
             write the Janus config with as many (`chorus loadgen janus-config --tracks`)"
        ));
    }
    Ok(sdp.to_owned())
}

/// One viewer's Janus session: the socket, its session and plugin handle.
pub(crate) struct JanusViewer {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_trans: u64,
    session: u64,
    handle: u64,
}

impl JanusViewer {
    /// Opens the API socket, creates a session and attaches the streaming plugin.
    pub(crate) async fn open(url: &str, timeout: Duration) -> Result<JanusViewer, String> {
        let mut req = url
            .into_client_request()
            .map_err(|e| format!("Janus URL {url:?}: {e}"))?;
        req.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_static("janus-protocol"),
        );
        let (ws, _) = tokio::time::timeout(timeout, tokio_tungstenite::connect_async(req))
            .await
            .map_err(|_| format!("Janus at {url} did not open a WebSocket within {timeout:?}"))?
            .map_err(|e| format!("cannot open the Janus WebSocket {url}: {e}"))?;
        let mut v = JanusViewer {
            ws,
            next_trans: 1,
            session: 0,
            handle: 0,
        };
        let created = v.request(json!({"janus": "create"}), timeout).await?;
        v.session = created["data"]["id"]
            .as_u64()
            .ok_or_else(|| format!("create answered without data.id: {created}"))?;
        let attached = v
            .request(
                json!({"janus": "attach", "session_id": v.session, "plugin": STREAMING}),
                timeout,
            )
            .await?;
        v.handle = attached["data"]["id"]
            .as_u64()
            .ok_or_else(|| format!("attach answered without data.id: {attached}"))?;
        Ok(v)
    }

    /// `watch` mountpoint `id`: returns Janus's offer, checked to hold `streams` audio streams.
    pub(crate) async fn watch(
        &mut self,
        id: u64,
        streams: usize,
        timeout: Duration,
    ) -> Result<String, String> {
        let ev = self
            .message(json!({"request": "watch", "id": id}), None, timeout)
            .await?;
        watch_offer(&ev, streams)
    }

    /// `start` with our answer. Its candidate is in the SDP: no trickle follows.
    pub(crate) async fn start(
        &mut self,
        answer_sdp: &str,
        timeout: Duration,
    ) -> Result<(), String> {
        let jsep = json!({"type": "answer", "sdp": answer_sdp, "trickle": false});
        let ev = self
            .message(json!({"request": "start"}), Some(jsep), timeout)
            .await?;
        match ev["plugindata"]["data"]["result"]["status"].as_str() {
            Some("starting") | Some("started") => Ok(()),
            _ => Err(format!("start answered something else than starting: {ev}")),
        }
    }

    async fn message(
        &mut self,
        body: Value,
        jsep: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, String> {
        let mut m = json!({"janus": "message", "session_id": self.session,
                           "handle_id": self.handle, "body": body});
        if let Some(j) = jsep {
            m["jsep"] = j;
        }
        self.request(m, timeout).await
    }

    /// Sends `msg` under a new transaction and waits for its answer.
    async fn request(&mut self, mut msg: Value, timeout: Duration) -> Result<Value, String> {
        let trans = format!("t{}", self.next_trans);
        self.next_trans += 1;
        let what = msg["janus"].as_str().unwrap_or("request").to_owned();
        let what = match msg["body"]["request"].as_str() {
            Some(r) => format!("{what} {r}"),
            None => what,
        };
        msg["transaction"] = json!(trans);
        self.ws
            .send(Message::Text(msg.to_string().into()))
            .await
            .map_err(|e| format!("Janus WebSocket send failed: {e}"))?;
        let wait = async {
            while let Some(m) = self.ws.next().await {
                let text = match m {
                    Ok(Message::Text(t)) => t,
                    Ok(Message::Close(_)) => {
                        return Err(format!(
                            "Janus closed the WebSocket before answering {what}"
                        ))
                    }
                    Ok(_) => continue,
                    Err(e) => return Err(format!("Janus WebSocket failed: {e}")),
                };
                let Ok(v) = serde_json::from_str::<Value>(text.as_str()) else {
                    return Err(format!("Janus sent something other than JSON: {text:?}"));
                };
                match classify(&v, &trans) {
                    Reply::NotYet => {}
                    Reply::Done(v) => return Ok(v),
                    Reply::Refused(e) => return Err(format!("{what}: {e}")),
                }
            }
            Err(format!(
                "Janus closed the WebSocket before answering {what}"
            ))
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| format!("Janus did not answer {what} within {timeout:?}"))?
    }

    /// Reads (and drops) Janus's events (webrtcup, media, slowlink) until the socket closes,
    /// and keeps the session alive as janus.js does (a keepalive every
    /// [`KEEPALIVE`]: Janus ends a session idle for 60 s). Returns why it ended.
    pub(crate) async fn drain(mut self) -> String {
        let mut tick = tokio::time::interval(KEEPALIVE);
        tick.tick().await;
        loop {
            tokio::select! {
                m = self.ws.next() => match m {
                    None => return "closed".into(),
                    Some(Ok(Message::Close(_))) => return "closed by Janus".into(),
                    Some(Ok(Message::Text(t))) => {
                        if t.as_str().contains("\"hangup\"") {
                            tracing::warn!("Janus hung up a viewer: {}", t.as_str());
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return format!("failed: {e}"),
                },
                _ = tick.tick() => {
                    let trans = format!("k{}", self.next_trans);
                    self.next_trans += 1;
                    let m = json!({"janus": "keepalive", "session_id": self.session,
                                   "transaction": trans});
                    if let Err(e) = self.ws.send(Message::Text(m.to_string().into())).await {
                        return format!("keepalive failed: {e}");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_matched_to_their_transaction() {
        let ack = json!({"janus": "ack", "session_id": 1, "transaction": "t3"});
        assert_eq!(classify(&ack, "t3"), Reply::NotYet);
        let other = json!({"janus": "success", "transaction": "t2", "data": {"id": 5}});
        assert_eq!(classify(&other, "t3"), Reply::NotYet);
        let webrtcup = json!({"janus": "webrtcup", "session_id": 1, "sender": 2});
        assert_eq!(classify(&webrtcup, "t3"), Reply::NotYet);
        let ok = json!({"janus": "success", "transaction": "t3", "data": {"id": 5}});
        assert_eq!(classify(&ok, "t3"), Reply::Done(ok.clone()));
        let err = json!({"janus": "error", "transaction": "t3",
                         "error": {"code": 458, "reason": "No such session 1"}});
        assert_eq!(
            classify(&err, "t3"),
            Reply::Refused("Janus error 458: No such session 1".into())
        );
        let plugin_err = json!({"janus": "event", "transaction": "t3", "plugindata": {
            "plugin": STREAMING, "data": {"error_code": 455, "error": "No such mountpoint/stream 9"}}});
        assert_eq!(
            classify(&plugin_err, "t3"),
            Reply::Refused("streaming plugin error 455: No such mountpoint/stream 9".into())
        );
    }

    #[test]
    fn a_watch_offer_must_hold_every_stream() {
        let sdp = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:a0\r\n\
                   m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:a1\r\n";
        let ev = json!({"janus": "event", "transaction": "t4",
                        "plugindata": {"data": {"result": {"status": "preparing"}}},
                        "jsep": {"type": "offer", "sdp": sdp}});
        assert_eq!(watch_offer(&ev, 2).unwrap(), sdp);
        let e = watch_offer(&ev, 3).unwrap_err();
        assert!(e.contains("offers 2 audio streams"), "{e}");
        let no_jsep = json!({"janus": "event", "plugindata": {"data": {}}});
        assert!(watch_offer(&no_jsep, 2)
            .unwrap_err()
            .contains("without an offer"));
    }
}
