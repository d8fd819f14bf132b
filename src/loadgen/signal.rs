//! The SDK's signalling, as a client: the director's HTTP API, then the WebSocket transaction
//! protocol. Every failure is a sentence that says what refused or could not be reached.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Largest director answer read.
const MAX_HTTP_BODY: usize = 1 << 20;

/// `http://host:port[/prefix]` split into what a request needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HttpBase {
    pub host_port: String,
    pub prefix: String,
}

impl HttpBase {
    pub(crate) fn parse(url: &str) -> Result<HttpBase, String> {
        let rest = url.strip_prefix("http://").ok_or_else(|| {
            format!("--url must start with http:// (the director of chorus), got {url:?}")
        })?;
        let (host_port, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if host_port.is_empty() {
            return Err(format!("no host in {url:?}"));
        }
        let host_port = if host_port.contains(':') && !host_port.ends_with(']') {
            host_port.to_owned()
        } else {
            format!("{host_port}:80")
        };
        Ok(HttpBase {
            host_port,
            prefix: path.trim_end_matches('/').to_owned(),
        })
    }
}

/// What the director gives a client.
#[derive(Debug, Clone)]
pub(crate) struct Grant {
    pub ws_url: String,
    pub jwt: String,
}

/// A director request: `POST {base}/api/director/{publish|subscribe}`.
pub(crate) async fn director(
    base: &HttpBase,
    kind: &str,
    body: &Value,
    bearer: Option<&str>,
    timeout: Duration,
) -> Result<Grant, String> {
    let path = format!("{}/api/director/{kind}", base.prefix);
    let (status, body) =
        tokio::time::timeout(timeout, post_json(&base.host_port, &path, body, bearer))
            .await
            .map_err(|_| {
                format!(
                    "director at {} did not answer within {timeout:?}",
                    base.host_port
                )
            })??;
    let v: Value = serde_json::from_slice(&body).map_err(|_| {
        format!(
            "director answered HTTP {status} with something other than JSON: {:?}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        )
    })?;
    if !(200..300).contains(&status) {
        let msg = v["data"]["message"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| v.to_string());
        return Err(format!("director refused {kind} (HTTP {status}): {msg}"));
    }
    let ws_url = v["data"]["urls"][0]
        .as_str()
        .ok_or_else(|| format!("director answer without data.urls[0]: {v}"))?;
    let jwt = v["data"]["jwt"]
        .as_str()
        .ok_or_else(|| format!("director answer without data.jwt: {v}"))?;
    Ok(Grant {
        ws_url: ws_url.to_owned(),
        jwt: jwt.to_owned(),
    })
}

async fn post_json(
    host_port: &str,
    path: &str,
    body: &Value,
    bearer: Option<&str>,
) -> Result<(u16, Vec<u8>), String> {
    let mut s = TcpStream::connect(host_port)
        .await
        .map_err(|e| format!("cannot reach the director at {host_port}: {e}"))?;
    let body = body.to_string();
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: {host_port}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(b) = bearer {
        req.push_str(&format!("Authorization: Bearer {b}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(&body);
    let io = |e: std::io::Error| format!("director at {host_port}: {e}");
    s.write_all(req.as_bytes()).await.map_err(io)?;
    let mut resp = Vec::new();
    (&mut s)
        .take(MAX_HTTP_BODY as u64)
        .read_to_end(&mut resp)
        .await
        .map_err(io)?;
    parse_http_response(&resp).map_err(|e| format!("director at {host_port}: {e}"))
}

/// (status, body) of an HTTP/1.1 response read to its end.
pub(crate) fn parse_http_response(resp: &[u8]) -> Result<(u16, Vec<u8>), String> {
    let split = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("incomplete HTTP response")?;
    let head = String::from_utf8_lossy(&resp[..split]);
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad HTTP status line {:?}", head.lines().next()))?;
    let body = &resp[split + 4..];
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    Ok((
        status,
        if chunked {
            dechunk(body)?
        } else {
            body.to_vec()
        },
    ))
}

fn dechunk(mut b: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let eol = b
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("bad chunked body")?;
        let size = std::str::from_utf8(&b[..eol])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next()?.trim(), 16).ok())
            .ok_or("bad chunk size")?;
        if size == 0 {
            return Ok(out);
        }
        let data = b
            .get(eol + 2..eol + 2 + size)
            .ok_or("truncated chunked body")?;
        out.extend_from_slice(data);
        b = b.get(eol + 2 + size + 2..).unwrap_or(&[]);
    }
}

/// An open signalling WebSocket.
pub(crate) struct Signalling {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_trans: u64,
    /// Events that arrived while waiting for a response.
    pub events_seen: u64,
}

impl Signalling {
    pub(crate) async fn connect(g: &Grant, timeout: Duration) -> Result<Signalling, String> {
        if !g.ws_url.starts_with("ws://") {
            return Err(format!(
                "signalling URL {:?}: only ws:// is supported by loadgen",
                g.ws_url
            ));
        }
        let sep = if g.ws_url.contains('?') { '&' } else { '?' };
        let url = format!("{}{sep}token={}", g.ws_url, g.jwt);
        let (ws, _) = tokio::time::timeout(timeout, tokio_tungstenite::connect_async(url))
            .await
            .map_err(|_| format!("signalling at {} did not open within {timeout:?}", g.ws_url))?
            .map_err(|e| format!("cannot open the signalling socket {}: {e}", g.ws_url))?;
        Ok(Signalling {
            ws,
            next_trans: 1,
            events_seen: 0,
        })
    }

    /// Sends a command and waits for its response; an `error` answer becomes Err.
    pub(crate) async fn command(
        &mut self,
        name: &str,
        data: Value,
        timeout: Duration,
    ) -> Result<Value, String> {
        let trans = self.next_trans;
        self.next_trans += 1;
        let cmd = json!({"type": "cmd", "transId": trans, "name": name, "data": data});
        self.ws
            .send(Message::Text(cmd.to_string().into()))
            .await
            .map_err(|e| format!("signalling send failed: {e}"))?;
        let wait = async {
            while let Some(msg) = self.ws.next().await {
                let text = match msg {
                    Ok(Message::Text(t)) => t,
                    Ok(Message::Close(c)) => {
                        return Err(format!(
                            "signalling closed by the server before answering {name}: {}",
                            c.map(|c| c.reason.to_string()).unwrap_or_default()
                        ))
                    }
                    Ok(_) => continue,
                    Err(e) => return Err(format!("signalling socket failed: {e}")),
                };
                let Ok(v) = serde_json::from_str::<Value>(text.as_str()) else {
                    return Err(format!(
                        "signalling sent something other than JSON: {text:?}"
                    ));
                };
                let same = v["transId"].as_u64() == Some(trans);
                match v["type"].as_str() {
                    Some("response") if same => return Ok(v["data"].clone()),
                    Some("error") if same || v["transId"].is_null() => {
                        let msg = v["data"]["message"]
                            .as_str()
                            .map(str::to_owned)
                            .unwrap_or_else(|| v["data"].to_string());
                        return Err(format!("server refused {name}: {msg}"));
                    }
                    _ => self.events_seen += 1,
                }
            }
            Err(format!(
                "signalling closed by the server before answering {name}"
            ))
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| format!("no answer to {name} within {timeout:?}"))?
    }

    /// Reads (and drops) whatever the server sends until it closes the socket; the server
    /// queues events per viewer, so a client that stops reading would grow its memory.
    /// Returns why it ended.
    pub(crate) async fn drain(mut self) -> String {
        while let Some(msg) = self.ws.next().await {
            match msg {
                Ok(Message::Close(c)) => {
                    return format!(
                        "closed by the server{}",
                        c.map(|c| format!(": {}", c.reason)).unwrap_or_default()
                    )
                }
                Ok(Message::Text(t)) => {
                    self.events_seen += 1;
                    if t.as_str().contains("\"type\":\"error\"") {
                        tracing::warn!("signalling error event: {}", t.as_str());
                    }
                }
                Ok(_) => {}
                Err(e) => return format!("failed: {e}"),
            }
        }
        "closed".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls() {
        assert_eq!(
            HttpBase::parse("http://127.0.0.1:8080").unwrap(),
            HttpBase {
                host_port: "127.0.0.1:8080".into(),
                prefix: "".into()
            }
        );
        assert_eq!(
            HttpBase::parse("http://example.com/x/").unwrap(),
            HttpBase {
                host_port: "example.com:80".into(),
                prefix: "/x".into()
            }
        );
        assert!(HttpBase::parse("https://a").is_err());
        assert!(HttpBase::parse("http:///x").is_err());
    }

    #[test]
    fn http_responses_plain_and_chunked() {
        let (s, b) = parse_http_response(b"HTTP/1.1 401 Unauthorized\r\nX: y\r\n\r\n{}").unwrap();
        assert_eq!((s, b.as_slice()), (401, &b"{}"[..]));
        let (s, b) = parse_http_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((s, b.as_slice()), (200, &b"abcde"[..]));
        assert!(parse_http_response(b"garbage").is_err());
        assert!(parse_http_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
        )
        .is_err());
    }
}
