//! A connection's sending side: the socket, behind its write buffer, shared
//! by the connection's writer task and whoever has an answer ready. The
//! writer task drains the connection's queues (answers first, then
//! deliveries). An answer produced on the connection's own task (a publish
//! appended inline) may instead go straight to the socket when nothing is
//! queued or buffered ahead of it and the socket takes it at once: on an
//! idle broker that answer then wakes no task at all. Nothing ever waits for
//! the socket here; an answer that cannot be written at once is queued as
//! before, and its slot in the answer queue was reserved beforehand. Over
//! TLS nothing is written at once: the stream encrypts in order under its
//! own lock, so every answer goes through the writer task.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::security::tls::{self, WriteHalf};
use futures_util::FutureExt;
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::sync::{Mutex, MutexGuard};

/// How an answer offered for writing at once went.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Written {
    /// All of it is on the socket.
    Sent,
    /// Part of it is on the socket and the rest in the write buffer: the
    /// writer task must be woken to flush it.
    Buffered,
    /// Nothing was written: queue it.
    NotNow,
}

pub(crate) struct Outbox {
    writer: Mutex<BufWriter<WriteHalf>>,
    /// The write buffer's size.
    capacity: usize,
    /// Answers queued for the writer task and not yet in the write buffer.
    /// An answer written at once must not overtake any of them.
    answers_queued: AtomicUsize,
    /// Set (under the lock) once the writer task has given up on the
    /// socket or shut it: a write there may have stopped mid-frame, so
    /// nothing more may be written at once.
    closed: AtomicBool,
}

impl Outbox {
    pub fn new(capacity: usize, socket: WriteHalf) -> Outbox {
        Outbox {
            writer: Mutex::new(BufWriter::with_capacity(capacity, socket)),
            capacity,
            answers_queued: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
        }
    }

    /// Counts an answer about to be queued for the writer task.
    pub fn answer_queued(&self) {
        self.answers_queued.fetch_add(1, Ordering::AcqRel);
    }

    /// Uncounts a queued answer, once it is in the write buffer (or was not
    /// queued after all).
    pub fn answer_taken(&self) {
        self.answers_queued.fetch_sub(1, Ordering::AcqRel);
    }

    /// The write buffer and socket, for the writer task.
    pub async fn lock(&self) -> MutexGuard<'_, BufWriter<WriteHalf>> {
        self.writer.lock().await
    }

    /// Called by the writer task, holding the lock, when it stops writing:
    /// after a failed or timed-out write, or at the end.
    pub fn close(&self, _held: &MutexGuard<'_, BufWriter<WriteHalf>>) {
        self.closed.store(true, Ordering::Release);
    }

    /// Writes `frame` now, without waiting, if nothing queued or buffered
    /// comes before it and the writer task is not writing.
    pub fn try_write_now(&self, frame: &[u8]) -> Written {
        let Ok(mut writer) = self.writer.try_lock() else { return Written::NotNow };
        // Checked under the lock: the writer task uncounts an answer only
        // once it is in the buffer, under the same lock.
        if self.closed.load(Ordering::Acquire)
            || self.answers_queued.load(Ordering::Acquire) != 0
            || !writer.buffer().is_empty()
        {
            return Written::NotNow;
        }
        // Only what the empty buffer can hold whole: the rest of a partly
        // sent frame must go there without touching the socket.
        if frame.len() >= self.capacity {
            return Written::NotNow;
        }
        let sent = match tls::try_write(writer.get_ref(), frame) {
            Ok(sent) => sent,
            // WouldBlock (the socket is full) or an error the writer task
            // will meet and handle on its next write.
            Err(_) => return Written::NotNow,
        };
        if sent == frame.len() {
            return Written::Sent;
        }
        // The rest must follow at once, before anything else. An empty
        // buffer copies input smaller than itself without any I/O, so this
        // completes on its first poll.
        let copied = writer.write_all(&frame[sent..]).now_or_never();
        debug_assert!(matches!(copied, Some(Ok(()))), "a small write into an empty buffer completes at once");
        Written::Buffered
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    async fn pair() -> (Outbox, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let (_, write_half) = tls::split_plain(server);
        (Outbox::new(1024, write_half), client)
    }

    #[tokio::test]
    async fn an_answer_with_nothing_ahead_goes_straight_to_the_socket() {
        let (outbox, mut client) = pair().await;
        assert_eq!(outbox.try_write_now(b"first"), Written::Sent);
        let mut read = [0u8; 5];
        client.read_exact(&mut read).await.unwrap();
        assert_eq!(&read, b"first");
    }

    #[tokio::test]
    async fn an_answer_never_overtakes_a_queued_or_buffered_one() {
        let (outbox, _client) = pair().await;
        outbox.answer_queued();
        assert_eq!(outbox.try_write_now(b"second"), Written::NotNow);
        outbox.answer_taken();
        outbox.lock().await.write_all(b"buffered").await.unwrap();
        assert_eq!(outbox.try_write_now(b"third"), Written::NotNow);
        // Nor while the writer task holds the socket.
        let mut writer = outbox.lock().await;
        writer.flush().await.unwrap();
        assert_eq!(outbox.try_write_now(b"fourth"), Written::NotNow);
        drop(writer);
        assert_eq!(outbox.try_write_now(b"fifth"), Written::Sent);
        // Nor once the writer task has stopped writing.
        let writer = outbox.lock().await;
        outbox.close(&writer);
        drop(writer);
        assert_eq!(outbox.try_write_now(b"sixth"), Written::NotNow);
    }
}
