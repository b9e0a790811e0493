//! The null target (`--driver null`): no broker. A topic is an in-memory
//! list of payloads, a send is acknowledged at once, a consumer reads the
//! list. Run against it, a benchmark measures the load generator itself:
//! its rates are the ceiling of what it can report for any broker, and
//! its latencies what it adds to every broker's.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use tokio::sync::Notify;

use super::BenchError;
use super::driver::{Ack, BoxFuture, Consumer, ConsumerOptions, Delivery, Driver, Producer, StartAt};

/// The most payload bytes a null topic holds unread by its slowest
/// consumer (or at all, before a consumer exists); a send beyond it fails.
pub const NULL_TOPIC_BYTES_MAX: u64 = 2 << 30;

/// No broker: see the module's documentation.
#[derive(Default)]
pub struct NullTarget {
    topics: Mutex<HashMap<String, Arc<Topic>>>,
}

/// One topic: payloads from index `first` on, and every reader's position.
#[derive(Default)]
struct Topic {
    log: Mutex<Log>,
    appended: Notify,
}

#[derive(Default)]
struct Log {
    first: u64,
    payloads: VecDeque<Bytes>,
    bytes: u64,
    /// Each consumer's (or group's) next index.
    cursors: HashMap<String, Arc<AtomicU64>>,
}

impl Log {
    /// Forgets what every reader has read.
    fn trim(&mut self) {
        let Some(slowest) = self.cursors.values().map(|cursor| cursor.load(Ordering::Relaxed)).min() else { return };
        while self.first < slowest {
            let Some(payload) = self.payloads.pop_front() else { break };
            self.bytes -= payload.len() as u64;
            self.first += 1;
        }
    }
}

impl NullTarget {
    pub fn new() -> NullTarget {
        NullTarget::default()
    }

    fn topic(&self, name: &str) -> Result<Arc<Topic>, BenchError> {
        let topics = self.topics.lock().unwrap_or_else(PoisonError::into_inner);
        topics.get(name).cloned().ok_or_else(|| BenchError::Target(format!("null: no topic {name}")))
    }
}

impl Driver for NullTarget {
    fn describe(&self) -> String {
        "null (no broker: the load generator alone, every send acknowledged at once)".into()
    }

    fn windows(&self) -> BoxFuture<'_, Result<String, BenchError>> {
        Box::pin(async { Ok(format!("none; at most {NULL_TOPIC_BYTES_MAX} bytes held per topic")) })
    }

    fn create<'a>(&'a self, topic: &'a str, _partitions: u32) -> BoxFuture<'a, Result<(), BenchError>> {
        Box::pin(async move {
            let mut topics = self.topics.lock().unwrap_or_else(PoisonError::into_inner);
            if topics.contains_key(topic) {
                return Err(BenchError::Target(format!("null: topic {topic} exists")));
            }
            topics.insert(topic.to_owned(), Arc::default());
            Ok(())
        })
    }

    fn delete<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<(), BenchError>> {
        Box::pin(async move {
            self.topics.lock().unwrap_or_else(PoisonError::into_inner).remove(topic);
            Ok(())
        })
    }

    fn producer<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<Arc<dyn Producer>, BenchError>> {
        Box::pin(async move { Ok(Arc::new(NullProducer { topic: self.topic(topic)? }) as Arc<dyn Producer>) })
    }

    fn consumer<'a>(
        &'a self,
        topic: &'a str,
        options: ConsumerOptions,
    ) -> BoxFuture<'a, Result<Box<dyn Consumer>, BenchError>> {
        Box::pin(async move {
            let topic = self.topic(topic)?;
            let cursor = {
                let mut log = topic.log.lock().unwrap_or_else(PoisonError::into_inner);
                let start = match options.from {
                    StartAt::Start => log.first,
                    StartAt::End => log.first + log.payloads.len() as u64,
                };
                let name = options.group.unwrap_or_else(|| format!("consumer-{}", log.cursors.len()));
                Arc::clone(log.cursors.entry(name).or_insert_with(|| Arc::new(AtomicU64::new(start))))
            };
            Ok(Box::new(NullConsumer { topic, cursor }) as Box<dyn Consumer>)
        })
    }

    fn stop(self: Box<Self>) -> BoxFuture<'static, Result<(), BenchError>> {
        Box::pin(async { Ok(()) })
    }
}

struct NullProducer {
    topic: Arc<Topic>,
}

impl Producer for NullProducer {
    fn send(&self, _key: Option<Bytes>, payload: Bytes) -> BoxFuture<'_, Result<Ack, BenchError>> {
        Box::pin(async move {
            {
                let mut log = self.topic.log.lock().unwrap_or_else(PoisonError::into_inner);
                log.trim();
                if log.bytes + payload.len() as u64 > NULL_TOPIC_BYTES_MAX {
                    return Err(BenchError::Target(format!(
                        "null: more than {NULL_TOPIC_BYTES_MAX} bytes unread; the null target keeps payloads in memory"
                    )));
                }
                log.bytes += payload.len() as u64;
                log.payloads.push_back(payload);
            }
            self.topic.appended.notify_waiters();
            Ok(Box::pin(async { Ok(()) }) as Ack)
        })
    }

    fn close(self: Arc<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async {})
    }
}

struct NullConsumer {
    topic: Arc<Topic>,
    /// Shared by the members of a group: each index is read once.
    cursor: Arc<AtomicU64>,
}

impl Consumer for NullConsumer {
    fn next(&mut self) -> BoxFuture<'_, Result<Delivery, BenchError>> {
        Box::pin(async move {
            loop {
                let appended = self.topic.appended.notified();
                {
                    let log = self.topic.log.lock().unwrap_or_else(PoisonError::into_inner);
                    let end = log.first + log.payloads.len() as u64;
                    let next = self.cursor.load(Ordering::Relaxed);
                    if next < end {
                        self.cursor.store(next + 1, Ordering::Relaxed);
                        let payload = log.payloads[(next - log.first) as usize].clone();
                        return Ok(Delivery { payload, received_at: std::time::Instant::now(), redelivered: false });
                    }
                }
                appended.await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_null_topic_delivers_every_payload_once_per_group_and_forgets_what_all_have_read() {
        let target = NullTarget::new();
        target.create("t", 1).await.unwrap();
        let producer = target.producer("t").await.unwrap();
        let group = |name: &str| ConsumerOptions { from: StartAt::Start, window: 1, group: Some(name.into()) };
        let mut a1 = target.consumer("t", group("a")).await.unwrap();
        let mut a2 = target.consumer("t", group("a")).await.unwrap();
        let mut b = target.consumer("t", group("b")).await.unwrap();
        for index in 0..4u8 {
            producer.send(None, Bytes::from(vec![index])).await.unwrap().await.unwrap();
        }
        // Group a's two members share the four; group b reads them all.
        let mut shared = Vec::new();
        for _ in 0..2 {
            shared.push(a1.next().await.unwrap().payload[0]);
            shared.push(a2.next().await.unwrap().payload[0]);
        }
        assert_eq!(shared, [0, 1, 2, 3]);
        for index in 0..4u8 {
            assert_eq!(b.next().await.unwrap().payload[0], index);
        }
        let topic = target.topic("t").unwrap();
        producer.send(None, Bytes::from_static(b"x")).await.unwrap().await.unwrap();
        let log = topic.log.lock().unwrap();
        assert_eq!((log.first, log.payloads.len()), (4, 1), "read payloads are forgotten");
    }
}
