//! Which connection a request goes on. ckptd closes a kept-alive connection at its maximum age
//! (`connection_max_age_s`), as any HTTP server may at its keep-alive limit; a request sent on
//! that connection just as it closes is never answered. Requests the client retries survive
//! that. The ones it sends once (a GC run, a health probe) must not be exposed to it.
//!
//! The server here makes the race certain: it answers the first request on each connection and
//! closes the connection, unanswered, when a second one arrives on it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ckpt_client::{Client, ClientOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Default)]
struct Counts {
    connections: AtomicUsize,
    answered: AtomicUsize,
    closed_unanswered: AtomicUsize,
}

async fn one_answer_per_connection(mut sock: TcpStream, counts: Arc<Counts>) {
    let mut buf = Vec::new();
    let mut requests = 0;
    loop {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            match sock.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        buf.drain(..head_end);
        requests += 1;
        if requests > 1 {
            counts.closed_unanswered.fetch_add(1, Ordering::SeqCst);
            return;
        }
        let path = head.split_whitespace().nth(1).unwrap_or_default().to_string();
        let body = if path.starts_with("/v1/jobs/job/gc") {
            r#"{"job":"job","dry_run":false}"#
        } else if path == "/v1/jobs" {
            r#"{"jobs":["job"]}"#
        } else {
            "{}"
        };
        let answer = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        if sock.write_all(answer.as_bytes()).await.is_err() {
            return;
        }
        counts.answered.fetch_add(1, Ordering::SeqCst);
    }
}

#[tokio::test]
async fn requests_sent_once_go_on_a_connection_of_their_own() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let counts = Arc::new(Counts::default());
    let server = {
        let counts = counts.clone();
        tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else { return };
                counts.connections.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(one_answer_per_connection(sock, counts.clone()));
            }
        })
    };
    let test = async {
        let c = Client::new(&url, ClientOptions::default()).unwrap();
        // A pooled connection, answered once and kept alive.
        assert_eq!(c.jobs().await.unwrap(), vec!["job".to_string()]);

        // Sent once each: on that pooled connection they would meet its close unanswered.
        let report = c.gc(Some("job"), false).await.unwrap_or_else(|e| panic!("the GC request failed: {e}"));
        assert_eq!(report["jobs"][0]["job"], "job");
        c.health().await.unwrap_or_else(|e| panic!("the health probe failed: {e}"));
        assert_eq!(
            counts.closed_unanswered.load(Ordering::SeqCst),
            0,
            "a request sent once rode the pooled connection"
        );

        // A request the client retries may meet it, and is sent again.
        assert_eq!(c.jobs().await.unwrap(), vec!["job".to_string()]);
        assert_eq!(counts.closed_unanswered.load(Ordering::SeqCst), 1, "the pooled connection was used again");
        assert_eq!(counts.answered.load(Ordering::SeqCst), 4);
    };
    tokio::time::timeout(Duration::from_secs(60), test).await.expect("test exceeded its 60 s bound");
    server.abort();
}
