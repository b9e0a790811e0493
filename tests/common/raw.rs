//! Raw-socket helpers shared by the black-box tests: frames written and
//! read byte by byte over a plain TCP stream, for what the client library
//! would never send or would hide.

use std::io::ErrorKind;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weir::protocol::{ErrorCode, FRAME_HEADER_BYTES, FrameHeader, PROTOCOL_VERSION, Request, Response};

use super::within;

pub fn hello(version_min: u16, version_max: u16) -> Request {
    Request::Hello { version_min, version_max, client_name: "raw-test".into(), auth_token: Bytes::new() }
}

/// A frame header, for frames the codecs would not build.
pub fn raw_header(body_len: u32, frame_type: u8, correlation_id: u32) -> Vec<u8> {
    let mut header = Vec::with_capacity(FRAME_HEADER_BYTES);
    header.extend_from_slice(&(body_len + 5).to_be_bytes());
    header.push(frame_type);
    header.extend_from_slice(&correlation_id.to_be_bytes());
    header
}

/// One frame, or `None` at a clean end of stream between frames.
pub async fn read_frame<R: AsyncRead + Unpin>(reader: &mut R) -> std::io::Result<Option<(FrameHeader, Bytes)>> {
    let mut header = [0u8; FRAME_HEADER_BYTES];
    let mut filled = 0;
    while filled < FRAME_HEADER_BYTES {
        let read = reader.read(&mut header[filled..]).await?;
        if read == 0 {
            if filled == 0 {
                return Ok(None);
            }
            return Err(std::io::Error::new(ErrorKind::UnexpectedEof, "end of stream inside a frame header"));
        }
        filled += read;
    }
    let header = FrameHeader::parse(&header).map_err(|e| std::io::Error::new(ErrorKind::InvalidData, e))?;
    let mut body = vec![0u8; header.body_len as usize];
    reader.read_exact(&mut body).await?;
    Ok(Some((header, Bytes::from(body))))
}

/// Reads one response frame: (correlation id, response).
pub async fn read_response<R: AsyncRead + Unpin>(reader: &mut R) -> (u32, Response) {
    let frame = within("a response frame", read_frame(reader)).await.expect("reading a response frame");
    let (header, body) = frame.expect("a response frame, not the end of the stream");
    let response = Response::decode(header.frame_type, body).expect("a well-formed response");
    (header.correlation_id, response)
}

/// Asserts that the server closes the connection without sending anything
/// more. A reset counts as a close too (it is how a socket closed with
/// unread bytes ends).
pub async fn expect_closed<R: AsyncRead + Unpin>(reader: &mut R) {
    match within("the server to close the connection", read_frame(reader)).await {
        Ok(None) => {}
        Err(error) if error.kind() == ErrorKind::ConnectionReset => {}
        Ok(Some((header, body))) => panic!(
            "expected the connection to be closed, got frame {:#04x}: {:?}",
            header.frame_type,
            Response::decode(header.frame_type, body)
        ),
        Err(error) => panic!("expected the connection to be closed cleanly, got {error}"),
    }
}

/// The message of an ERROR with `code`; panics on anything else.
pub fn expect_error(response: &Response, code: ErrorCode) -> &str {
    match response {
        Response::Error { code: got, message } => {
            assert_eq!(ErrorCode::from_u16(*got), Some(code), "error code (message: {message})");
            message
        }
        other => panic!("expected ERROR {code:?}, got {other:?}"),
    }
}

pub async fn connect_raw(addr: &str) -> TcpStream {
    let stream = within("connect", TcpStream::connect(addr)).await.expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    stream
}

pub async fn write(stream: &mut (impl AsyncWriteExt + Unpin), bytes: &[u8]) {
    within("a write", stream.write_all(bytes)).await.expect("write to the server");
}

/// A raw connection after a successful HELLO / WELCOME (correlation id 1).
pub async fn handshake(addr: &str) -> TcpStream {
    let mut stream = connect_raw(addr).await;
    write(&mut stream, &hello(PROTOCOL_VERSION, PROTOCOL_VERSION).encode(1)).await;
    let (correlation_id, response) = read_response(&mut stream).await;
    assert_eq!(correlation_id, 1);
    assert!(matches!(response, Response::Welcome { version: PROTOCOL_VERSION, .. }), "{response:?}");
    stream
}

/// Sends one request and reads its answer (which must be the next frame).
pub async fn request(stream: &mut TcpStream, correlation_id: u32, request: Request) -> Response {
    write(stream, &request.encode(correlation_id)).await;
    let (answered, response) = read_response(stream).await;
    assert_eq!(answered, correlation_id, "correlation id of {response:?}");
    response
}
