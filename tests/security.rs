//! Security, over real TCP: TLS with certificates made at test time
//! (rcgen), plaintext refused on a TLS port, mutual TLS principals,
//! every permission allowed and denied, quotas measured, certificates
//! reloaded under load, and hostile names.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::authority::Authority;
use common::{addr, start, stop, test_config, within};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tempfile::TempDir;
use weir::client::{
    BackpressurePolicy, ClientError, ClientTlsOptions, ConnectOptions, Connection, Event, Publisher, PublisherOptions,
    SubscribeOptions, Subscriber,
};
use weir::config::Config;
use weir::protocol::{ChannelRetention, ErrorCode, Request, Response, StartPosition};
use weir::record::Message;
use weir::security::principal::hash_token;
use weir::server::{ServerError, ServerHandle};

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// A credentials file only its owner may read.
fn credentials(dir: &Path, text: &str) -> PathBuf {
    let path = write(dir, "credentials.toml", text);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// Files of a TLS broker: its CA, certificate and key.
struct TlsFiles {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn server_tls(dir: &Path, authority: &Authority) -> TlsFiles {
    let (cert, key) = authority.leaf("weir-test-broker", true);
    TlsFiles {
        ca: write(dir, "ca.pem", &authority.pem),
        cert: write(dir, "broker.pem", &cert),
        key: write(dir, "broker.key", &key),
    }
}

fn tls_config(dir: &TempDir, files: &TlsFiles) -> Config {
    Config { tls_cert: Some(files.cert.clone()), tls_key: Some(files.key.clone()), ..test_config(dir) }
}

fn over_tls(ca: &Path, token: Option<&str>) -> ConnectOptions {
    ConnectOptions {
        client_name: "security-test".into(),
        auth_token: token.map(str::to_owned),
        tls: Some(ClientTlsOptions { ca: Some(ca.to_owned()), ..ClientTlsOptions::default() }),
    }
}

fn plain(token: &str) -> ConnectOptions {
    ConnectOptions { client_name: "security-test".into(), auth_token: Some(token.into()), tls: None }
}

async fn connect(server: &ServerHandle, options: &ConnectOptions) -> Result<Connection, ClientError> {
    within("a connection", Connection::connect_with(&addr(server), options)).await
}

async fn publish_one(connection: &Connection, channel: &str, payload: &str) -> Result<Response, ClientError> {
    let request = Request::Publish {
        channel: channel.into(),
        partition: None,
        producer: None,
        message: Message::from_payload(payload.to_owned()),
    };
    within("a publish", connection.request(request)).await
}

fn assert_unauthorized(result: Result<Response, ClientError>, expected: &str) {
    match result {
        Err(error @ ClientError::Server { .. }) => {
            assert_eq!(error.code(), Some(ErrorCode::Unauthorized), "{error}");
            assert!(error.to_string().contains(expected), "{error} should say {expected:?}");
        }
        other => panic!("expected Unauthorized ({expected}), got {other:?}"),
    }
}

#[tokio::test]
async fn tls_carries_the_protocol_and_a_plaintext_client_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let files = server_tls(dir.path(), &Authority::new("test CA"));
    let server = start(tls_config(&dir, &files)).await;

    let connection = connect(&server, &over_tls(&files.ca, None)).await.expect("a TLS client connects");
    let Response::PublishAck { first_offset, .. } = publish_one(&connection, "secure", "over tls").await.unwrap()
    else {
        panic!("expected PUBLISH_ACK");
    };
    assert_eq!(first_offset, 0);
    let options = SubscribeOptions { start: StartPosition::Earliest, ..SubscribeOptions::default() };
    let mut subscriber = within("subscribe", Subscriber::subscribe(&connection, "secure", options)).await.unwrap();
    match within("a delivery", subscriber.next()).await {
        Some(Ok(Event::Message { record, .. })) => assert_eq!(record.payload, Bytes::from("over tls")),
        other => panic!("expected the message, got {other:?}"),
    }

    // A plaintext HELLO on the TLS port gets no WELCOME: the handshake
    // fails and is counted.
    let refused = connect(&server, &ConnectOptions::named("plaintext")).await;
    assert!(refused.is_err(), "a plaintext client must not be served on a TLS port: {refused:?}");
    // A client that trusts another CA refuses the broker.
    let stranger = write(dir.path(), "other-ca.pem", &Authority::new("other CA").pem);
    let distrusted = connect(&server, &over_tls(&stranger, None)).await;
    assert!(matches!(distrusted, Err(ClientError::Tls(_))), "{distrusted:?}");
    within("the failures to be counted", async {
        while server.stats().tls_handshake_failures.load(Ordering::Relaxed) < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    drop(subscriber);
    drop(connection);
    stop(server).await;
}

#[tokio::test]
async fn mutual_tls_maps_the_certificate_name_to_a_principal() {
    let dir = tempfile::tempdir().unwrap();
    let authority = Authority::new("test CA");
    let files = server_tls(dir.path(), &authority);
    let clients = Authority::new("clients CA");
    let clients_ca = write(dir.path(), "clients-ca.pem", &clients.pem);
    let users =
        credentials(dir.path(), "[[users]]\nname = \"billing\"\npublish = [\"billing.*\"]\nadmin = [\"billing.*\"]\n");
    let config = Config { tls_client_ca: Some(clients_ca), credentials_file: Some(users), ..tls_config(&dir, &files) };
    let server = start(config).await;
    let client_tls = |common_name: &str, authority: &Authority| {
        let (cert, key) = authority.leaf(common_name, false);
        ClientTlsOptions {
            ca: Some(files.ca.clone()),
            cert: Some(write(dir.path(), &format!("{common_name}.pem"), &cert)),
            key: Some(write(dir.path(), &format!("{common_name}.key"), &key)),
        }
    };

    let billing = ConnectOptions { tls: Some(client_tls("billing", &clients)), ..ConnectOptions::named("billing") };
    let connection = connect(&server, &billing).await.expect("a certificate of a known user connects");
    assert!(matches!(publish_one(&connection, "billing.invoices", "x").await, Ok(Response::PublishAck { .. })));
    assert_unauthorized(
        publish_one(&connection, "orders", "x").await,
        "principal billing may not publish to channel orders",
    );

    // Without a certificate, or with one another CA signed, the handshake
    // fails; with a good certificate of an unknown name, HELLO does.
    // Refused by the TLS layer, not by HELLO (which would also refuse a
    // connection without a certificate): no ERROR frame comes back, and
    // the broker counts two failed handshakes.
    let failures_before = server.stats().tls_handshake_failures.load(Ordering::Relaxed);
    let without = connect(&server, &over_tls(&files.ca, None)).await;
    assert!(matches!(&without, Err(error) if error.code().is_none()), "{:?}", without.err());
    let foreign = ConnectOptions { tls: Some(client_tls("billing", &authority)), ..ConnectOptions::named("x") };
    let foreign = connect(&server, &foreign).await;
    assert!(matches!(&foreign, Err(error) if error.code().is_none()), "{:?}", foreign.err());
    within("the failed handshakes to be counted", async {
        while server.stats().tls_handshake_failures.load(Ordering::Relaxed) < failures_before + 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let unknown = ConnectOptions { tls: Some(client_tls("stranger", &clients)), ..ConnectOptions::named("x") };
    match connect(&server, &unknown).await {
        Err(error) => assert_eq!(error.code(), Some(ErrorCode::Unauthorized), "{error}"),
        Ok(_) => panic!("a certificate name that is no user must be refused"),
    }
    drop(connection);
    stop(server).await;
}

/// A broker with a credentials file of users with narrow permissions, and
/// the legacy token.
async fn broker_with_users(dir: &TempDir) -> ServerHandle {
    let hash = hash_token("secret").unwrap();
    let text = format!(
        r#"
[[users]]
name = "producer"
token_hash = "{hash}"
publish = ["orders.*"]

[[users]]
name = "consumer"
token_hash = "{hash}"
subscribe = ["orders.*"]
groups = ["billing"]

[[users]]
name = "operator"
token_hash = "{hash}"
admin = ["orders.*"]
"#
    );
    let config = Config {
        credentials_file: Some(credentials(dir.path(), &text)),
        auth_token: Some("legacy-token".into()),
        ..test_config(dir)
    };
    start(config).await
}

#[tokio::test]
async fn every_permission_is_checked_allowed_and_denied() {
    let dir = tempfile::tempdir().unwrap();
    let server = broker_with_users(&dir).await;
    let operator = connect(&server, &plain("operator:secret")).await.unwrap();
    let producer = connect(&server, &plain("producer:secret")).await.unwrap();
    let consumer = connect(&server, &plain("consumer:secret")).await.unwrap();
    let create = |channel: &str| Request::CreateChannel {
        channel: channel.into(),
        retention: ChannelRetention::default(),
        partitions: Some(2),
    };

    // admin: create, alter, list groups, delete.
    assert!(matches!(within("create", operator.request(create("orders.eu"))).await, Ok(Response::ChannelCreated)));
    assert_unauthorized(within("create", operator.request(create("audit"))).await, "may not create channel audit");
    assert_unauthorized(within("create", producer.request(create("orders.us"))).await, "may not create channel");
    let alter = |channel: &str| Request::AlterChannel { channel: channel.into(), partitions: 3 };
    assert!(matches!(within("alter", operator.request(alter("orders.eu"))).await, Ok(Response::ChannelAltered)));
    assert_unauthorized(within("alter", consumer.request(alter("orders.eu"))).await, "may not alter channel");
    let groups = |channel: &str| Request::ListGroups { channel: channel.into() };
    assert!(matches!(within("groups", operator.request(groups("orders.eu"))).await, Ok(Response::Groups { .. })));
    assert_unauthorized(within("groups", consumer.request(groups("orders.eu"))).await, "may not list the groups");

    // publish, and the creation a first publish would do.
    assert!(matches!(publish_one(&producer, "orders.eu", "one").await, Ok(Response::PublishAck { .. })));
    assert_unauthorized(
        publish_one(&producer, "audit", "x").await,
        "principal producer may not publish to channel audit",
    );
    assert_unauthorized(publish_one(&consumer, "orders.eu", "x").await, "may not publish to channel orders.eu");
    assert_unauthorized(publish_one(&producer, "orders.new", "x").await, "may not create channel orders.new");

    // subscribe, fetch, and a group.
    let subscribe = |group: Option<&str>| SubscribeOptions {
        start: StartPosition::Earliest,
        group: group.map(str::to_owned),
        ..SubscribeOptions::default()
    };
    let mut subscriber = within("subscribe", Subscriber::subscribe(&consumer, "orders.eu", subscribe(None)))
        .await
        .expect("the consumer may subscribe");
    assert!(matches!(within("a delivery", subscriber.next()).await, Some(Ok(Event::Message { .. }))));
    let denied = within("subscribe", Subscriber::subscribe(&producer, "orders.eu", subscribe(None))).await;
    assert!(matches!(&denied, Err(error) if error.code() == Some(ErrorCode::Unauthorized)), "{:?}", denied.err());
    let member = within("join", Subscriber::subscribe(&consumer, "orders.eu", subscribe(Some("billing")))).await;
    assert!(member.is_ok(), "{:?}", member.err());
    let outsider = within("join", Subscriber::subscribe(&consumer, "orders.eu", subscribe(Some("fraud")))).await;
    assert!(outsider.err().is_some_and(|error| error.to_string().contains("may not join consumer group fraud")));
    let fetch = common::fetch_from_start;
    assert!(matches!(within("fetch", consumer.request(fetch("orders.eu"))).await, Ok(Response::FetchResult { .. })));
    assert_unauthorized(within("fetch", producer.request(fetch("orders.eu"))).await, "may not fetch from channel");

    // A refusal never tells whether the channel exists.
    let existing = publish_one(&consumer, "orders.eu", "x").await.unwrap_err().to_string();
    let missing = publish_one(&consumer, "orders.nowhere", "x").await.unwrap_err().to_string();
    assert_eq!(existing.replace("orders.eu", "NAME"), missing.replace("orders.nowhere", "NAME"));

    // Listings show only what the principal has a permission on.
    assert!(matches!(within("create", operator.request(create("orders.us"))).await, Ok(Response::ChannelCreated)));
    let legacy = connect(&server, &plain("legacy-token")).await.expect("the legacy token still works");
    assert!(matches!(within("create", legacy.request(create("audit"))).await, Ok(Response::ChannelCreated)));
    let names = |connection: Connection| async move {
        let Ok(Response::Channels { channels }) = within("list", connection.request(Request::ListChannels)).await
        else {
            panic!("expected CHANNELS");
        };
        let mut names: Vec<String> = channels.into_iter().map(|info| info.name).collect();
        names.sort();
        names
    };
    assert_eq!(names(consumer.clone()).await, ["orders.eu", "orders.us"]);
    assert_eq!(names(legacy.clone()).await, ["audit", "orders.eu", "orders.us"]);
    // METADATA too, also when the hidden channel is named.
    for (channel, expected) in [("", &["orders.eu", "orders.us"][..]), ("audit", &[][..])] {
        let metadata = weir::client::Metadata::fetch(&consumer, channel).await.unwrap();
        let listed: Vec<&str> = metadata.channels.iter().map(|listed| listed.name.as_str()).collect();
        assert_eq!(listed, expected);
    }
    let Ok(Response::Stats { channels, .. }) = within("stats", producer.request(Request::Stats)).await else {
        panic!("expected STATS_RESULT");
    };
    assert!(channels.iter().all(|channel| channel.name.starts_with("orders.")));
    // Who reads a channel is shown to its readers, not to a publisher.
    let readers = |connection: Connection| async move {
        let Ok(Response::Channels { channels }) = within("list", connection.request(Request::ListChannels)).await
        else {
            panic!("expected CHANNELS");
        };
        channels.into_iter().find(|info| info.name == "orders.eu").map_or(0, |info| info.subscriptions.len())
    };
    assert!(readers(consumer.clone()).await > 0);
    assert_eq!(readers(producer.clone()).await, 0);

    // A durable name holds a position as a group does: the same permission.
    let durable = |name: &str| SubscribeOptions {
        durable_name: Some(name.to_owned()),
        start: StartPosition::Earliest,
        ..SubscribeOptions::default()
    };
    let allowed = within("durable", Subscriber::subscribe(&consumer, "orders.eu", durable("billing"))).await;
    assert!(allowed.is_ok(), "{:?}", allowed.err());
    let refused = within("durable", Subscriber::subscribe(&consumer, "orders.eu", durable("someone-else"))).await;
    assert!(
        refused.as_ref().err().is_some_and(|e| e.to_string().contains("may not use durable subscription name")),
        "{:?}",
        refused.err()
    );

    // The connection stays open after a refusal; delete is admin too.
    let delete = |channel: &str| Request::DeleteChannel { channel: channel.into(), force: true };
    assert_unauthorized(within("delete", producer.request(delete("orders.us"))).await, "may not delete channel");
    assert!(matches!(within("delete", operator.request(delete("orders.us"))).await, Ok(Response::ChannelDeleted)));
    assert_eq!(server.stats().unauthorized.load(Ordering::Relaxed), 14);
    drop((subscriber, member, allowed));
    stop(server).await;
}

#[tokio::test]
async fn a_reload_closes_the_connections_of_users_it_removed_or_changed_and_only_theirs() {
    let dir = tempfile::tempdir().unwrap();
    let server = broker_with_users(&dir).await;
    let legacy = connect(&server, &plain("legacy-token")).await.unwrap();
    let create = Request::CreateChannel {
        channel: "orders.eu".into(),
        retention: ChannelRetention::default(),
        partitions: None,
    };
    assert!(matches!(within("create", legacy.request(create)).await, Ok(Response::ChannelCreated)));
    let producer = connect(&server, &plain("producer:secret")).await.unwrap();
    let operator = connect(&server, &plain("operator:secret")).await.unwrap();
    let consumer = connect(&server, &plain("consumer:secret")).await.unwrap();
    let mut subscriber = Subscriber::subscribe(&consumer, "orders.eu", SubscribeOptions::default()).await.unwrap();
    assert!(matches!(publish_one(&producer, "orders.eu", "one").await, Ok(Response::PublishAck { .. })));
    assert!(matches!(within("a delivery", subscriber.next()).await, Some(Ok(Event::Message { .. }))));

    // A reload that changes nobody closes nothing.
    server.reload().expect("the same file loads");
    // The consumer loses the channel; the operator is removed; the
    // producer's entry is unchanged.
    let hash = hash_token("secret").unwrap();
    let producer_entry = std::fs::read_to_string(dir.path().join("credentials.toml")).unwrap();
    let producer_entry = producer_entry.split("[[users]]").find(|entry| entry.contains("\"producer\"")).unwrap();
    let text = format!(
        r#"
[[users]]{producer_entry}
[[users]]
name = "consumer"
token_hash = "{hash}"
subscribe = ["audit"]
"#
    );
    credentials(dir.path(), &text);
    server.reload().expect("the new file loads");
    match within("the subscription's end", subscriber.next()).await {
        Some(Err(error)) => {
            assert_eq!(error.code(), Some(ErrorCode::Unauthorized), "{error}");
            assert!(error.to_string().contains("principal consumer were removed or changed by a reload"), "{error}");
        }
        other => panic!("the consumer's subscription must end with Unauthorized, got {other:?}"),
    }
    assert!(within("PING", consumer.request(Request::Ping)).await.is_err(), "the consumer's connection is closed");
    assert!(within("PING", operator.request(Request::Ping)).await.is_err(), "the operator's connection is closed");
    assert!(matches!(publish_one(&producer, "orders.eu", "two").await, Ok(Response::PublishAck { .. })));
    assert!(matches!(within("PING", legacy.request(Request::Ping)).await, Ok(Response::Pong)));
    // Connecting again gives the new permissions.
    let consumer = connect(&server, &plain("consumer:secret")).await.unwrap();
    let refused = Subscriber::subscribe(&consumer, "orders.eu", SubscribeOptions::default()).await;
    assert_eq!(refused.err().and_then(|error| error.code()), Some(ErrorCode::Unauthorized));
    stop(server).await;
}

#[tokio::test]
async fn wrong_credentials_are_refused_at_hello() {
    let dir = tempfile::tempdir().unwrap();
    let server = broker_with_users(&dir).await;
    for credential in ["producer:wrong", "nobody:secret", "producer", "", "legacy-token "] {
        match connect(&server, &plain(credential)).await {
            Err(error) => assert_eq!(error.code(), Some(ErrorCode::Unauthorized), "{credential:?}: {error}"),
            Ok(_) => panic!("{credential:?} must be refused"),
        }
    }
    assert_eq!(server.stats().authentication_failures.load(Ordering::Relaxed), 5);
    stop(server).await;
}

#[tokio::test]
async fn a_credentials_file_others_can_read_stops_the_broker_from_starting() {
    let dir = tempfile::tempdir().unwrap();
    let path = credentials(dir.path(), "");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let config = Config { credentials_file: Some(path), ..test_config(&dir) };
    match weir::server::start(config).await {
        Err(error @ ServerError::Credentials(_)) => assert!(error.to_string().contains("chmod 600"), "{error}"),
        Err(other) => panic!("expected a credentials error, got {other}"),
        Ok(_) => panic!("the broker must refuse a world-readable credentials file"),
    }
}

#[tokio::test]
async fn a_principals_connections_are_limited() {
    let dir = tempfile::tempdir().unwrap();
    let server = broker_with_quota(&dir, "max_connections = 2").await;
    let first = connect(&server, &plain("app:pw")).await.unwrap();
    let second = connect(&server, &plain("app:pw")).await.unwrap();
    match connect(&server, &plain("app:pw")).await {
        Err(error) => {
            assert_eq!(error.code(), Some(ErrorCode::TooManyConnections), "{error}");
            assert!(error.to_string().contains("principal app is at its max_connections = 2"), "{error}");
        }
        Ok(_) => panic!("a third connection must be refused"),
    }
    drop(first);
    // The slot is freed when the broker sees the connection end.
    within("a freed slot", async {
        loop {
            if connect(&server, &plain("app:pw")).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    drop(second);
    stop(server).await;
}

/// Publishes as fast as acknowledgements allow until `stop`, `concurrency`
/// publishes in flight; returns each acknowledgement's arrival time.
async fn publish_flat_out(publisher: Arc<Publisher>, stop: Arc<AtomicBool>, concurrency: usize) -> Vec<Instant> {
    let mut acks = Vec::new();
    let mut inflight = FuturesUnordered::new();
    let publish = |publisher: Arc<Publisher>| async move { publisher.publish(Message::from_payload("q")).await };
    loop {
        while !stop.load(Ordering::Relaxed) && inflight.len() < concurrency {
            inflight.push(publish(Arc::clone(&publisher)));
        }
        match inflight.next().await {
            Some(result) => {
                result.expect("a throttled publish is retried, not failed");
                acks.push(Instant::now());
            }
            None => return acks,
        }
    }
}

#[tokio::test]
async fn a_publisher_over_its_quota_is_held_to_it_and_others_are_not() {
    const QUOTA: u64 = 200;
    let dir = tempfile::tempdir().unwrap();
    let hash = hash_token("pw").unwrap();
    let text = format!(
        "[[users]]\nname = \"slow\"\ntoken_hash = \"{hash}\"\npublish = [\"*\"]\nadmin = [\"*\"]\n[users.quotas]\npublish_messages_per_sec = {QUOTA}\n\n[[users]]\nname = \"fast\"\ntoken_hash = \"{hash}\"\npublish = [\"*\"]\nadmin = [\"*\"]\n"
    );
    let server = start(Config { credentials_file: Some(credentials(dir.path(), &text)), ..test_config(&dir) }).await;
    let options = |token: &str| PublisherOptions {
        auth_token: Some(token.into()),
        batch_max_messages: 1,
        backpressure: BackpressurePolicy::Retry { max_attempts: 100_000 },
        ..PublisherOptions::default()
    };
    let slow = Arc::new(
        within("connect", Publisher::connect(&addr(&server), "quota.slow", options("slow:pw"))).await.unwrap(),
    );
    let fast = Arc::new(
        within("connect", Publisher::connect(&addr(&server), "quota.fast", options("fast:pw"))).await.unwrap(),
    );
    let stop_flag = Arc::new(AtomicBool::new(false));
    let slow_task = tokio::spawn(publish_flat_out(Arc::clone(&slow), Arc::clone(&stop_flag), 32));
    let fast_task = tokio::spawn(publish_flat_out(Arc::clone(&fast), Arc::clone(&stop_flag), 32));
    // Measured from the first refusal: the burst is spent by then, and
    // the bucket stays empty while the publisher keeps pushing.
    within("the first quota refusal", async {
        while server.stats().publishes_rejected_quota.load(Ordering::Relaxed) == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await;
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop_flag.store(true, Ordering::Relaxed);
    let slow_acks = within("the slow publisher", slow_task).await.unwrap();
    let fast_acks = within("the fast publisher", fast_task).await.unwrap();
    let window = |acks: &[Instant]| {
        let (from, to) = (started, started + Duration::from_secs(5));
        acks.iter().filter(|&&at| at >= from && at < to).count() as u64
    };
    let (slow_count, fast_count) = (window(&slow_acks), window(&fast_acks));
    let expected = QUOTA * 5;
    eprintln!("in 5 s: {slow_count} publishes at a quota of {QUOTA}/s, {fast_count} without a quota");
    assert!(
        (expected * 9 / 10..=expected * 11 / 10).contains(&slow_count),
        "the slow principal published {slow_count} in 5 s; its quota allows {expected} ± 10%"
    );
    assert!(fast_count > 3 * expected, "the unlimited principal published only {fast_count} in 5 s");
    assert!(server.stats().publishes_rejected_quota.load(Ordering::Relaxed) > 0);
    drop((slow, fast));
    stop(server).await;
}

/// A broker with one user, `app` (token `pw`), allowed everything, with
/// one quota (`key = value` of `[users.quotas]`).
async fn broker_with_quota(dir: &TempDir, quota: &str) -> ServerHandle {
    let hash = hash_token("pw").unwrap();
    let text = format!(
        "[[users]]\nname = \"app\"\ntoken_hash = \"{hash}\"\npublish = [\"*\"]\nsubscribe = [\"*\"]\nadmin = [\"*\"]\n[users.quotas]\n{quota}\n"
    );
    start(Config { credentials_file: Some(credentials(dir.path(), &text)), ..test_config(dir) }).await
}

#[tokio::test]
async fn a_publish_refused_for_quota_creates_no_channel() {
    let dir = tempfile::tempdir().unwrap();
    let server = broker_with_quota(&dir, "publish_messages_per_sec = 1").await;
    let connection = connect(&server, &plain("app:pw")).await.unwrap();
    assert!(matches!(publish_one(&connection, "first", "x").await, Ok(Response::PublishAck { .. })));
    match publish_one(&connection, "second", "x").await {
        Ok(Response::Backpressure { reason, retry_after_ms, .. }) => {
            assert_eq!(reason, weir::protocol::BackpressureReason::Quota);
            assert!((1..=1000).contains(&retry_after_ms), "{retry_after_ms}");
        }
        other => panic!("expected BACKPRESSURE for the quota, got {other:?}"),
    }
    let Ok(Response::Channels { channels }) = within("list", connection.request(Request::ListChannels)).await else {
        panic!("expected CHANNELS");
    };
    let names: Vec<&str> = channels.iter().map(|info| info.name.as_str()).collect();
    assert_eq!(names, ["first"]);
    stop(server).await;
}

#[tokio::test]
async fn deliveries_over_the_subscribe_quota_wait() {
    const QUOTA: u64 = 50_000;
    const MESSAGES: usize = 200;
    let dir = tempfile::tempdir().unwrap();
    let server = broker_with_quota(&dir, &format!("subscribe_bytes_per_sec = {QUOTA}")).await;
    let connection = connect(&server, &plain("app:pw")).await.unwrap();
    let payload = "x".repeat(1000);
    for _ in 0..MESSAGES {
        publish_one(&connection, "backlog", &payload).await.unwrap();
    }
    let options = SubscribeOptions { start: StartPosition::Earliest, ..SubscribeOptions::default() };
    let mut subscriber = within("subscribe", Subscriber::subscribe(&connection, "backlog", options)).await.unwrap();
    let started = Instant::now();
    let mut received = 0;
    while received < MESSAGES {
        match within("a delivery", subscriber.next()).await {
            Some(Ok(Event::Message { record, .. })) => {
                received += 1;
                subscriber.ack(record.offset).await.unwrap();
            }
            Some(Ok(_)) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    // More than 200 KB of records at 50 KB/s, one second of it as burst:
    // at least three seconds, however fast the machine.
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(2900), "200 KB delivered in {elapsed:?} under a 50 KB/s quota");
    drop(subscriber);
    stop(server).await;
}

#[tokio::test]
async fn certificates_reload_under_load_without_a_dropped_publish() {
    let dir = tempfile::tempdir().unwrap();
    let old_authority = Authority::new("old CA");
    let files = server_tls(dir.path(), &old_authority);
    let old_ca = write(dir.path(), "old-ca.pem", &old_authority.pem);
    let server = start(tls_config(&dir, &files)).await;
    let options = PublisherOptions { tls: over_tls(&old_ca, None).tls, ..PublisherOptions::default() };
    let publisher = Arc::new(within("connect", Publisher::connect(&addr(&server), "reload", options)).await.unwrap());
    let stop_flag = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(publish_flat_out(Arc::clone(&publisher), Arc::clone(&stop_flag), 64));
    within("some publishes before the reload", async {
        while server.stats().messages_appended.load(Ordering::Relaxed) < 1000 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;

    // New files from another CA, then SIGHUP's reload.
    let new_authority = Authority::new("new CA");
    let (cert, key) = new_authority.leaf("weir-test-broker", true);
    write(dir.path(), "broker.pem", &cert);
    write(dir.path(), "broker.key", &key);
    let new_ca = write(dir.path(), "new-ca.pem", &new_authority.pem);
    server.reload().expect("the new files load");
    let before = server.stats().messages_appended.load(Ordering::Relaxed);
    assert!(connect(&server, &over_tls(&new_ca, None)).await.is_ok(), "new handshakes use the new certificate");
    assert!(connect(&server, &over_tls(&old_ca, None)).await.is_err(), "the old certificate is no longer served");
    within("publishes after the reload", async {
        while server.stats().messages_appended.load(Ordering::Relaxed) < before + 1000 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    // A file that does not parse keeps the running configuration.
    write(dir.path(), "broker.pem", "not a certificate");
    assert!(server.reload().is_err());
    assert!(connect(&server, &over_tls(&new_ca, None)).await.is_ok());

    stop_flag.store(true, Ordering::Relaxed);
    let acks = within("the publisher", load).await.unwrap();
    // Every publish was acknowledged (none failed), and the channel holds
    // exactly those, densely.
    let reader = connect(&server, &over_tls(&new_ca, None)).await.unwrap();
    let Ok(Response::Channels { channels }) = within("list", reader.request(Request::ListChannels)).await else {
        panic!("expected CHANNELS");
    };
    let reload = channels.iter().find(|info| info.name == "reload").expect("the channel exists");
    assert_eq!(reload.partitions[0].next_offset, acks.len() as u64);
    drop(publisher);
    stop(server).await;
}

#[tokio::test]
async fn hostile_channel_and_group_names_never_reach_the_file_system() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    let config = Config { data_dir: data.clone(), ..test_config(&root) };
    let server = start(config).await;
    let connection = connect(&server, &ConnectOptions::named("hostile")).await.unwrap();
    let long = "a".repeat(256);
    let hostile = ["../evil", "..", ".", "a/evil", "/tmp/evil", "a\\evil", "evil\0x", "%2e%2e", " evil", long.as_str()];
    // A name longer than an sstr cannot even be sent: the client refuses it.
    let refused = |name: &str, result: Result<(), ClientError>, code: ErrorCode| match result {
        Err(ClientError::Invalid(_)) if name.len() > 255 => {}
        Err(error) => assert_eq!(error.code(), Some(code), "{name:?}: {error}"),
        Ok(()) => panic!("{name:?} must be refused"),
    };
    for name in hostile {
        refused(name, publish_one(&connection, name, "x").await.map(drop), ErrorCode::InvalidChannelName);
        let create =
            Request::CreateChannel { channel: name.into(), retention: ChannelRetention::default(), partitions: None };
        refused(name, within("create", connection.request(create)).await.map(drop), ErrorCode::InvalidChannelName);
        let group = SubscribeOptions { group: Some(name.to_owned()), ..SubscribeOptions::default() };
        let joined = within("join", Subscriber::subscribe(&connection, "fine", group)).await;
        refused(name, joined.map(drop), ErrorCode::InvalidRequest);
    }
    // Nothing was made outside the data directory, nor anything named
    // after the hostile names inside it.
    let outside: Vec<_> = std::fs::read_dir(root.path()).unwrap().map(|entry| entry.unwrap().file_name()).collect();
    assert_eq!(outside, ["data"]);
    let mut stack = vec![data];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            assert!(!entry.file_name().to_string_lossy().contains("evil"), "{:?}", entry.path());
            if entry.file_type().unwrap().is_dir() {
                stack.push(entry.path());
            }
        }
    }
    drop(connection);
    stop(server).await;
}
