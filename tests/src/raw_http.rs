//! One HTTP/1.1 request written by hand on a fresh connection: for the tests that must send
//! what no client library would (traversal paths, forged headers, bodies the server refuses),
//! and read every byte of the answer.

use std::collections::BTreeMap;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub struct RawResponse {
    pub status: u16,
    /// Header names lower-cased.
    pub headers: BTreeMap<String, String>,
    pub body: String,
}

impl RawResponse {
    /// The body as JSON, or `Null` when it is not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// Sends `method path` with `Authorization: auth` when given, then `body`, and reads the
/// answer to the end (`Connection: close`). Panics when the answer is not HTTP.
pub async fn raw_request(addr: &str, method: &str, path: &str, auth: Option<&str>, body: &[u8]) -> RawResponse {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = auth.map(|a| format!("Authorization: {a}\r\n")).unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    // A refused request may be answered before its body is read; the rest then meets a closed
    // socket, which is fine: the answer is what is checked.
    let _ = s.write_all(body).await;
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp).await;
    let text = String::from_utf8_lossy(&resp).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("{method} {path}: not an HTTP answer: {text}"));
    let headers = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    RawResponse { status, headers, body: body.to_string() }
}
