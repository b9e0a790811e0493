//! Reading the Prometheus endpoint from a test.
#![allow(dead_code)] // Each test binary uses a different subset.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The exposition page at `addr`, fetched with a bare HTTP/1.1 GET.
pub async fn scrape(addr: &str) -> String {
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    socket.write_all(b"GET /metrics HTTP/1.1\r\nHost: weir\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut response = String::new();
    socket.read_to_string(&mut response).await.unwrap();
    response
}

/// The value of the sample whose name and labels start with `series`.
pub fn sample(page: &str, series: &str) -> Option<f64> {
    page.lines()
        .filter(|line| !line.starts_with('#'))
        .find(|line| line.starts_with(series))?
        .rsplit(' ')
        .next()?
        .parse()
        .ok()
}
