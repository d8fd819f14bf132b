//! WebSocket helpers of the process-level tests: open a socket, send a command, read answers.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens `url`; Err is the HTTP status and the `fail` message of a refused upgrade.
pub async fn open(url: &str) -> Result<Ws, (u16, String)> {
    match tokio_tungstenite::connect_async(url).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let body: Value = resp
                .body()
                .as_deref()
                .and_then(|b| serde_json::from_slice(b).ok())
                .unwrap_or(Value::Null);
            let message = body["data"]["message"].as_str().unwrap_or_default();
            Err((resp.status().as_u16(), message.to_owned()))
        }
        Err(e) => panic!("ws connect: {e}"),
    }
}

/// The signalling socket of `addr` with a director JWT; Err is the status of a refusal.
pub async fn connect(addr: std::net::SocketAddr, jwt: &str) -> Result<Ws, u16> {
    open(&format!("ws://{addr}/ws?token={jwt}"))
        .await
        .map_err(|e| e.0)
}

/// Sends one text message and returns the next answer (`response` or `error`), skipping the
/// server events that may arrive in between.
pub async fn call(ws: &mut Ws, text: &str) -> Value {
    call_seeing(ws, text).await.0
}

/// Like [`call`], also returning the events that arrived before the answer.
pub async fn call_seeing(ws: &mut Ws, text: &str) -> (Value, Vec<Value>) {
    ws.send(Message::Text(text.into())).await.unwrap();
    let mut events = Vec::new();
    loop {
        let v = next_json(ws).await;
        if v["type"] != "event" {
            return (v, events);
        }
        events.push(v);
    }
}

/// The next text message, as JSON (pings and pongs skipped).
pub async fn next_json(ws: &mut Ws) -> Value {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("an answer")
            .expect("socket open")
            .expect("no error");
        if !matches!(m, Message::Ping(_) | Message::Pong(_)) {
            return serde_json::from_str(m.to_text().unwrap()).unwrap();
        }
    }
}

/// Reads until the event `name` arrives; returns its data.
pub async fn event(ws: &mut Ws, name: &str) -> Value {
    loop {
        let v = next_json(ws).await;
        if v["type"] == "event" && v["name"] == name {
            return v["data"].clone();
        }
    }
}
