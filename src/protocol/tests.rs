//! Round trips of every frame through encode and decode, and the decoder's
//! behaviour on arbitrary bytes.

use bytes::Bytes;
use proptest::prelude::*;

use super::frame::*;
use crate::record::{Header, Message};

fn bytes(max: usize) -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..max).prop_map(Bytes::from)
}

fn channel() -> impl Strategy<Value = String> {
    "[a-z0-9._-]{1,40}"
}

fn message() -> impl Strategy<Value = Message> {
    let header = (bytes(20), bytes(20)).prop_map(|(name, value)| Header { name, value });
    (bytes(30), proptest::collection::vec(header, 0..3), bytes(300)).prop_map(|(key, headers, payload)| Message {
        key,
        headers,
        payload,
    })
}

fn producer() -> impl Strategy<Value = Option<ProducerSequence>> {
    proptest::option::of(
        (any::<u64>(), any::<u64>()).prop_map(|(producer_id, sequence)| ProducerSequence { producer_id, sequence }),
    )
}

fn start() -> impl Strategy<Value = StartPosition> {
    prop_oneof![
        Just(StartPosition::Earliest),
        Just(StartPosition::Latest),
        any::<u64>().prop_map(StartPosition::Offset),
        any::<u64>().prop_map(StartPosition::TimeUs),
    ]
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        (any::<u16>(), any::<u16>(), "[ -~]{0,40}", bytes(40)).prop_map(
            |(version_min, version_max, client_name, auth_token)| {
                Request::Hello { version_min, version_max, client_name, auth_token }
            }
        ),
        Just(Request::Ping),
        (channel(), option_u32(), producer(), message()).prop_map(|(channel, partition, producer, message)| {
            Request::Publish { channel, partition, producer, message }
        }),
        (channel(), option_u32(), producer(), proptest::collection::vec(message(), 1..5)).prop_map(
            |(channel, partition, producer, messages)| Request::PublishBatch { channel, partition, producer, messages }
        ),
        (
            any::<u32>(),
            channel(),
            option_u32(),
            start(),
            proptest::option::of("[a-z]{1,20}"),
            proptest::option::of("[a-z]{1,20}"),
            any::<u32>()
        )
            .prop_map(|(subscription_id, channel, partition, start, durable_name, group, max_inflight)| {
                Request::Subscribe { subscription_id, channel, partition, start, durable_name, group, max_inflight }
            }),
        (any::<u32>(), any::<u32>(), any::<u64>()).prop_map(|(subscription_id, partition, offset)| Request::Ack {
            subscription_id,
            partition,
            offset
        }),
        any::<u32>().prop_map(|subscription_id| Request::Unsubscribe { subscription_id }),
        (channel(), any::<u32>(), any::<u64>(), any::<u32>(), any::<u32>()).prop_map(
            |(channel, partition, offset, max_messages, max_bytes)| {
                Request::Fetch { channel, partition, offset, max_messages, max_bytes }
            }
        ),
        (
            channel(),
            proptest::option::of(any::<u64>()),
            proptest::option::of(any::<u64>()),
            proptest::option::of(any::<u64>()),
            proptest::option::of(1u32..)
        )
            .prop_map(|(channel, max_bytes, max_age_secs, max_messages, partitions)| Request::CreateChannel {
                channel,
                retention: ChannelRetention { max_bytes, max_age_secs, max_messages },
                partitions,
            }),
        Just(Request::ListChannels),
        Just(Request::Stats),
        (channel(), any::<u32>()).prop_map(|(channel, partitions)| Request::AlterChannel { channel, partitions }),
        prop_oneof![Just(String::new()), channel()].prop_map(|channel| Request::ListGroups { channel }),
        prop_oneof![Just(String::new()), channel()].prop_map(|channel| Request::Metadata { channel }),
        (channel(), any::<bool>()).prop_map(|(channel, force)| Request::DeleteChannel { channel, force }),
    ]
}

fn option_u32() -> impl Strategy<Value = Option<u32>> {
    proptest::option::of(any::<u32>())
}

/// What `request` becomes through a version 1 frame: no partition (0, or
/// the broker's choice), no group, the default partition count. `None` for
/// requests version 1 does not have.
fn as_version_1(request: &Request) -> Option<Request> {
    let mut request = request.clone();
    match &mut request {
        Request::Publish { partition, .. } | Request::PublishBatch { partition, .. } => *partition = None,
        Request::Subscribe { partition, group, .. } => {
            *partition = Some(0);
            *group = None;
        }
        Request::Ack { partition, .. } | Request::Fetch { partition, .. } => *partition = 0,
        Request::CreateChannel { partitions, .. } => *partitions = None,
        Request::AlterChannel { .. }
        | Request::ListGroups { .. }
        | Request::DeleteChannel { .. }
        | Request::Metadata { .. } => return None,
        _ => {}
    }
    Some(request)
}

/// What `response` becomes through a version 1 frame: partition 0 alone.
fn as_version_1_response(response: &Response) -> Option<Response> {
    let mut response = response.clone();
    match &mut response {
        // Consumer groups are version 2 only: a version 1 connection is
        // never sent their notices.
        Response::Notice { notice: Notice::Assigned { .. } | Notice::Revoked { .. }, .. } => return None,
        Response::PublishAck { partition, .. }
        | Response::Deliver { partition, .. }
        | Response::Notice { partition, .. } => *partition = 0,
        Response::Subscribed { partitions, .. } => {
            *partitions = vec![(0, partitions.first().map_or(0, |&(_, first_offset)| first_offset))];
        }
        Response::Channels { channels } => {
            for channel in channels {
                channel.partitions.truncate(1);
                if channel.partitions.is_empty() {
                    channel.partitions.push(PartitionInfo {
                        start_offset: 0,
                        next_offset: 0,
                        size_bytes: 0,
                        segment_count: 0,
                    });
                }
                channel.subscriptions.retain(|s| s.partition == 0);
                for subscription in &mut channel.subscriptions {
                    subscription.group.clear();
                }
            }
        }
        Response::Stats { channels, .. } => {
            for channel in channels {
                channel.subscriptions.retain(|s| s.partition == 0);
            }
        }
        Response::ChannelAltered | Response::Groups { .. } | Response::ChannelDeleted | Response::Metadata { .. } => {
            return None;
        }
        _ => {}
    }
    Some(response)
}

fn response() -> impl Strategy<Value = Response> {
    let limits = proptest::array::uniform10(any::<u32>()).prop_map(|v| Limits {
        max_message_bytes: v[0],
        max_frame_bytes: v[1],
        max_batch_bytes: v[2],
        max_batch_records: v[3],
        max_inflight_publishes: v[4],
        max_inflight_publish_bytes: v[9],
        max_inflight_deliveries: v[5],
        max_subscriptions_per_connection: v[6],
        heartbeat_interval_ms: v[7],
        idle_timeout_ms: v[8],
    });
    let subscription =
        ("[a-z]{0,10}", "[a-z]{0,5}", 0u32..3, any::<u64>(), proptest::option::of(any::<u64>()), any::<u64>())
            .prop_map(|(durable_name, group, partition, next_offset, acked_offset, lag)| SubscriptionInfo {
                durable_name,
                group,
                partition,
                next_offset,
                acked_offset,
                lag,
            });
    let partition_info = any::<[u64; 4]>().prop_map(|v| PartitionInfo {
        start_offset: v[0],
        next_offset: v[1],
        size_bytes: v[2],
        segment_count: v[3],
    });
    let channel_info =
        (channel(), proptest::collection::vec(partition_info, 1..4), proptest::collection::vec(subscription, 0..3))
            .prop_map(|(name, partitions, subscriptions)| ChannelInfo { name, partitions, subscriptions });
    prop_oneof![
        (any::<u16>(), "[ -~]{0,20}", limits).prop_map(|(version, server_version, limits)| Response::Welcome {
            version,
            server_version,
            limits
        }),
        Just(Response::Pong),
        (any::<u32>(), any::<u64>(), any::<u32>(), any::<u64>(), any::<bool>()).prop_map(
            |(partition, first_offset, count, timestamp_us, duplicate)| {
                Response::PublishAck { partition, first_offset, count, timestamp_us, duplicate }
            }
        ),
        (channel(), any::<u32>()).prop_map(|(channel, retry_after_ms)| Response::Backpressure {
            channel,
            reason: BackpressureReason::ChannelQueueFull,
            retry_after_ms
        }),
        (any::<u16>(), "[ -~]{0,60}").prop_map(|(code, message)| Response::Error { code, message }),
        (any::<u32>(), proptest::collection::vec((any::<u32>(), any::<u64>()), 1..4))
            .prop_map(|(subscription_id, partitions)| Response::Subscribed { subscription_id, partitions }),
        (any::<u32>(), any::<u32>(), 2u32..10, bytes(100)).prop_map(|(subscription_id, partition, count, records)| {
            Response::Deliver { subscription_id, partition, count, records }
        }),
        (any::<u32>(), any::<u32>(), any::<u64>(), any::<u64>()).prop_map(
            |(subscription_id, partition, lag, next_offset)| Response::Notice {
                subscription_id,
                partition,
                notice: Notice::Lag { lag, next_offset }
            }
        ),
        any::<u32>().prop_map(|subscription_id| Response::Unsubscribed { subscription_id }),
        (any::<u64>(), any::<u32>(), bytes(100)).prop_map(|(next_offset, count, records)| Response::FetchResult {
            next_offset,
            count,
            records
        }),
        Just(Response::ChannelCreated),
        Just(Response::ChannelAltered),
        Just(Response::ChannelDeleted),
        (any::<u32>(), any::<u32>(), any::<u64>(), any::<u64>()).prop_map(
            |(subscription_id, partition, generation, first_offset)| Response::Notice {
                subscription_id,
                partition,
                notice: Notice::Assigned { generation, first_offset }
            }
        ),
        (any::<u32>(), any::<u32>(), any::<u64>()).prop_map(|(subscription_id, partition, generation)| {
            Response::Notice { subscription_id, partition, notice: Notice::Revoked { generation } }
        }),
        proptest::collection::vec(
            (
                channel(),
                "[a-z]{1,10}",
                any::<u64>(),
                any::<u32>(),
                proptest::collection::vec(
                    (
                        any::<u32>(),
                        proptest::option::of(any::<u64>()),
                        proptest::option::of(any::<u64>()),
                        any::<u64>()
                    ),
                    0..4
                )
            ),
            0..3
        )
        .prop_map(|groups| Response::Groups {
            groups: groups
                .into_iter()
                .map(|(channel, name, generation, member_count, partitions)| GroupInfo {
                    channel,
                    name,
                    generation,
                    member_count,
                    partitions: partitions
                        .into_iter()
                        .map(|(partition, owner, committed, lag)| GroupPartitionInfo {
                            partition,
                            owner,
                            committed,
                            lag
                        })
                        .collect(),
                })
                .collect()
        }),
        proptest::collection::vec(channel_info, 0..3).prop_map(|channels| Response::Channels { channels }),
        (
            any::<u64>(),
            any::<bool>(),
            proptest::collection::vec((any::<u64>(), "[0-9.:]{1,21}"), 0..4),
            proptest::collection::vec(
                (
                    channel(),
                    any::<u8>(),
                    proptest::collection::vec(
                        (proptest::option::of(any::<u64>()), proptest::collection::vec(any::<u64>(), 0..6)),
                        0..4
                    )
                ),
                0..3
            )
        )
            .prop_map(|(node_id, clustered, nodes, channels)| Response::Metadata {
                node_id,
                clustered,
                nodes: nodes.into_iter().map(|(node_id, client_addr)| NodeInfo { node_id, client_addr }).collect(),
                channels: channels
                    .into_iter()
                    .map(|(name, replication_factor, partitions)| ChannelMetadata {
                        name,
                        replication_factor,
                        partitions: partitions
                            .into_iter()
                            .map(|(leader, replicas)| PartitionMetadata { leader, replicas })
                            .collect(),
                    })
                    .collect(),
            }),
        (
            proptest::collection::vec(("[a-z_]{1,30}", any::<u64>()), 0..5),
            proptest::collection::vec(
                (
                    channel(),
                    any::<[u64; 4]>(),
                    proptest::collection::vec(("[a-z]{0,8}", 0u32..3, any::<u64>(), any::<u64>()), 0..3)
                ),
                0..3
            )
        )
            .prop_map(|(counters, channels)| Response::Stats {
                counters,
                channels: channels
                    .into_iter()
                    .map(|(name, v, subscriptions)| ChannelStats {
                        name,
                        messages_appended: v[0],
                        bytes_appended: v[1],
                        next_offset: v[2],
                        size_bytes: v[3],
                        subscriptions: subscriptions
                            .into_iter()
                            .map(|(durable_name, partition, lag, inflight)| SubscriptionStats {
                                durable_name,
                                partition,
                                lag,
                                inflight,
                            })
                            .collect(),
                    })
                    .collect(),
            }),
    ]
}

fn split(frame: &[u8]) -> (FrameHeader, Bytes) {
    let header = FrameHeader::parse(frame[..FRAME_HEADER_BYTES].try_into().unwrap()).unwrap();
    assert_eq!(header.body_len as usize, frame.len() - FRAME_HEADER_BYTES);
    (header, Bytes::copy_from_slice(&frame[FRAME_HEADER_BYTES..]))
}

proptest! {
    #[test]
    fn requests_round_trip(request in request(), correlation_id: u32) {
        let frame = request.encode(correlation_id);
        let (header, body) = split(&frame);
        prop_assert_eq!(header.correlation_id, correlation_id);
        prop_assert_eq!(Request::decode(header.frame_type, body).unwrap(), request);
    }

    #[test]
    fn responses_round_trip(response in response(), correlation_id: u32) {
        let frame = response.encode(correlation_id);
        let (header, body) = split(&frame);
        prop_assert_eq!(header.correlation_id, correlation_id);
        prop_assert_eq!(Response::decode(header.frame_type, body).unwrap(), response);
    }

    #[test]
    fn version_1_frames_round_trip_to_their_partition_0_meaning(
        request in request(),
        response in response(),
        correlation_id: u32,
    ) {
        if let Some(expected) = as_version_1(&request) {
            let (header, body) = split(&request.encode_for(1, correlation_id));
            prop_assert_eq!(Request::decode_for(1, header.frame_type, body).unwrap(), expected);
        }
        if let Some(expected) = as_version_1_response(&response) {
            let (header, body) = split(&response.encode_for(1, correlation_id));
            prop_assert_eq!(Response::decode_for(1, header.frame_type, body).unwrap(), expected);
        }
    }

    #[test]
    fn arbitrary_bodies_never_panic(frame_type: u8, body in bytes(300), version in 1u16..=2) {
        let _ = Request::decode_for(version, frame_type, body.clone());
        let _ = Response::decode_for(version, frame_type, body);
    }

    #[test]
    fn any_channel_bytes_decode_to_the_request_or_to_a_refused_name(name in bytes(40)) {
        use super::wire::{DecodeError, NameField};
        let mut body = vec![name.len() as u8];
        body.extend_from_slice(&name);
        body.extend_from_slice(&[0; 20]);
        match Request::decode(FrameType::Fetch as u8, Bytes::from(body)) {
            Ok(Request::Fetch { channel, .. }) => prop_assert_eq!(channel.as_bytes(), &name[..]),
            Err(DecodeError::NameNotUtf8 { field: NameField::Channel, valid_up_to }) => {
                prop_assert_eq!(std::str::from_utf8(&name).map_err(|e| e.valid_up_to()), Err(valid_up_to));
            }
            other => prop_assert!(false, "{other:?}"),
        }
    }

    #[test]
    fn truncated_requests_are_errors_not_panics(request in request(), cut: prop::sample::Index) {
        let frame = request.encode(1);
        let (header, body) = split(&frame);
        if !body.is_empty() {
            let cut = cut.index(body.len());
            prop_assert!(Request::decode(header.frame_type, body.slice(..cut)).is_err());
        }
    }
}

#[test]
fn a_batch_count_larger_than_the_body_can_hold_is_refused_before_allocating() {
    let mut body = vec![1u8, b'c', 0];
    body.extend_from_slice(&u32::MAX.to_be_bytes());
    let error = Request::decode(FrameType::PublishBatch as u8, Bytes::from(body)).unwrap_err();
    assert!(error.to_string().contains("record_count"), "{error}");
}

/// `frame`'s body with the last byte of the only occurrence of `name`
/// replaced by 0xff, which is never UTF-8.
fn body_with_name_not_utf8(frame: &[u8], name: &str) -> (u8, Bytes) {
    let (header, body) = split(frame);
    let mut body = body.to_vec();
    let at = body.windows(name.len()).position(|window| window == name.as_bytes()).unwrap();
    body[at + name.len() - 1] = 0xff;
    (header.frame_type, Bytes::from(body))
}

#[test]
fn a_name_that_is_not_utf8_is_reported_by_field_once_the_rest_of_the_body_decodes() {
    use super::wire::{DecodeError, NameField};
    let fetch = Request::Fetch { channel: "orders".into(), partition: 0, offset: 0, max_messages: 1, max_bytes: 1 };
    let (frame_type, body) = body_with_name_not_utf8(&fetch.encode(1), "orders");
    assert_eq!(
        Request::decode(frame_type, body.clone()),
        Err(DecodeError::NameNotUtf8 { field: NameField::Channel, valid_up_to: 5 })
    );
    // Malformed otherwise too: that is what is reported.
    let mut longer = body.to_vec();
    longer.push(0);
    assert_eq!(Request::decode(frame_type, Bytes::from(longer)), Err(DecodeError::TrailingBytes { extra_bytes: 1 }));
    assert!(matches!(Request::decode(frame_type, body.slice(..body.len() - 1)), Err(DecodeError::Truncated { .. })));

    let subscribe = Request::Subscribe {
        subscription_id: 1,
        channel: "orders".into(),
        partition: None,
        start: StartPosition::Earliest,
        durable_name: Some("billing".into()),
        group: Some("workers".into()),
        max_inflight: 1,
    };
    let (frame_type, body) = body_with_name_not_utf8(&subscribe.encode(1), "billing");
    assert_eq!(
        Request::decode(frame_type, body),
        Err(DecodeError::NameNotUtf8 { field: NameField::DurableName, valid_up_to: 6 })
    );
    // Version 2's group name is reported by its own field.
    let (frame_type, body) = body_with_name_not_utf8(&subscribe.encode(1), "workers");
    assert_eq!(
        Request::decode(frame_type, body),
        Err(DecodeError::NameNotUtf8 { field: NameField::Group, valid_up_to: 6 })
    );

    // Any other text that is not UTF-8 is a malformed frame.
    let hello = Request::Hello { version_min: 1, version_max: 1, client_name: "cli".into(), auth_token: Bytes::new() };
    let (frame_type, body) = body_with_name_not_utf8(&hello.encode(1), "cli");
    assert_eq!(Request::decode(frame_type, body), Err(DecodeError::NotUtf8 { field: "client_name" }));
}

#[test]
fn a_length_below_the_header_is_rejected() {
    let mut header = [0u8; FRAME_HEADER_BYTES];
    header[3] = 4;
    assert!(FrameHeader::parse(&header).is_err());
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ")
}

#[test]
fn worked_example_in_protocol_md_matches_the_codec() {
    // The frames of the example. The partition fields version 2 adds all
    // name partition 0, the only one a version 1 connection sees; the
    // PUBLISH names none, as in version 1 (where it goes to partition 0).
    let hello = Request::Hello { version_min: 1, version_max: 1, client_name: "cli".into(), auth_token: Bytes::new() };
    let limits = Limits {
        max_message_bytes: 1048576,
        max_frame_bytes: 8388608,
        max_batch_bytes: 8388608,
        max_batch_records: 10000,
        max_inflight_publishes: 1024,
        max_inflight_publish_bytes: 67108864,
        max_inflight_deliveries: 4096,
        max_subscriptions_per_connection: 64,
        heartbeat_interval_ms: 10000,
        idle_timeout_ms: 30000,
    };
    let welcome = Response::Welcome { version: 1, server_version: "0.1.0".into(), limits };
    let publish = Request::Publish {
        channel: "orders".into(),
        partition: None,
        producer: None,
        message: Message::from_payload("hello"),
    };
    let ack = Response::PublishAck {
        partition: 0,
        first_offset: 0,
        count: 1,
        timestamp_us: 1795320000000000,
        duplicate: false,
    };
    let mut record = Vec::new();
    crate::record::encode(&mut record, 0, 1795320000000000, &Message::from_payload("hello"));
    let deliver = Response::Deliver { subscription_id: 1, partition: 0, count: 1, records: Bytes::from(record) };

    // Version 1.
    assert_eq!(hex(&hello.encode_for(1, 1)), "00 00 00 10 01 00 00 00 01 00 01 00 01 00 03 63 6c 69 00 00");
    assert_eq!(
        hex(&welcome.encode_for(1, 1)),
        "00 00 00 36 81 00 00 00 01 00 01 00 05 30 2e 31 2e 30 00 10 00 00 00 80 00 00 00 80 00 00 00 00 27 10 \
         00 00 04 00 04 00 00 00 00 00 10 00 00 00 00 40 00 00 27 10 00 00 75 30"
    );
    assert_eq!(
        hex(&publish.encode_for(1, 2)),
        "00 00 00 1a 03 00 00 00 02 06 6f 72 64 65 72 73 00 00 00 00 00 00 00 00 05 68 65 6c 6c 6f"
    );
    assert_eq!(
        hex(&ack.encode_for(1, 2)),
        "00 00 00 1a 83 00 00 00 02 00 00 00 00 00 00 00 00 00 00 00 01 00 06 60 d5 82 db b0 00 00"
    );
    assert_eq!(
        hex(&deliver.encode_for(1, 0)),
        "00 00 00 33 87 00 00 00 00 00 00 00 01 00 00 00 01 00 00 00 22 c0 58 8f e0 00 00 00 00 00 00 00 00 00 06 \
         60 d5 82 db b0 00 00 00 00 00 00 00 00 00 05 68 65 6c 6c 6f"
    );

    // Version 2. HELLO and WELCOME have the same layout in every version;
    // a HELLO for versions 1..=2 and the WELCOME that picks version 2
    // differ from the ones above in those fields alone.
    assert_eq!(hello.encode_for(2, 1), hello.encode_for(1, 1));
    assert_eq!(welcome.encode_for(2, 1), welcome.encode_for(1, 1));
    let hello_1_to_2 =
        Request::Hello { version_min: 1, version_max: 2, client_name: "cli".into(), auth_token: Bytes::new() };
    assert_eq!(hex(&hello_1_to_2.encode_for(2, 1)), "00 00 00 10 01 00 00 00 01 00 01 00 02 00 03 63 6c 69 00 00");
    let welcome_2 = Response::Welcome { version: 2, server_version: "0.1.0".into(), limits };
    assert_eq!(
        hex(&welcome_2.encode_for(2, 1)),
        "00 00 00 36 81 00 00 00 01 00 02 00 05 30 2e 31 2e 30 00 10 00 00 00 80 00 00 00 80 00 00 00 00 27 10 \
         00 00 04 00 04 00 00 00 00 00 10 00 00 00 00 40 00 00 27 10 00 00 75 30"
    );

    // PUBLISH naming no partition: flags 0, no partition field, the same
    // bytes as in version 1.
    assert_eq!(publish.encode_for(2, 2), publish.encode_for(1, 2));
    // The version 2 example of PROTOCOL.md: the same PUBLISH naming
    // partition 3 (length 0x1e = 5 + 25-byte body):
    //   00 00 00 1e  03  00 00 00 02   length, type, correlation id 2
    //   06 6f 72 64 65 72 73           channel "orders"
    //   02                             flags: bit 1, a partition follows; no producer
    //   00 00 00 03                    partition 3
    //   00 00                          key_len 0
    //   00 00                          header_count 0
    //   00 00 00 05 68 65 6c 6c 6f     payload "hello"
    let publish_to_3 = Request::Publish {
        channel: "orders".into(),
        partition: Some(3),
        producer: None,
        message: Message::from_payload("hello"),
    };
    assert_eq!(
        hex(&publish_to_3.encode_for(2, 2)),
        "00 00 00 1e 03 00 00 00 02 06 6f 72 64 65 72 73 02 00 00 00 03 00 00 00 00 00 00 00 05 68 65 6c 6c 6f"
    );
    // Version 1 has no partition field: the partition is left out.
    assert_eq!(publish_to_3.encode_for(1, 2), publish.encode_for(1, 2));

    // PUBLISH_ACK from partition 3 (length 0x1e = 5 + 25-byte body):
    //   00 00 00 1e  83  00 00 00 02   length, type, correlation id 2
    //   00 00 00 03                    partition 3 (v2)
    //   00 00 00 00 00 00 00 00        first_offset 0
    //   00 00 00 01                    count 1
    //   00 06 60 d5 82 db b0 00        timestamp_us 1795320000000000
    //   00                             duplicate 0
    let ack_3 = match ack.clone() {
        Response::PublishAck { first_offset, count, timestamp_us, duplicate, .. } => {
            Response::PublishAck { partition: 3, first_offset, count, timestamp_us, duplicate }
        }
        other => panic!("{other:?}"),
    };
    assert_eq!(
        hex(&ack_3.encode_for(2, 2)),
        "00 00 00 1e 83 00 00 00 02 00 00 00 03 00 00 00 00 00 00 00 00 00 00 00 01 00 06 60 d5 82 db b0 00 00"
    );

    // DELIVER from partition 3 (length 0x37 = 5 + 12 + 38-byte record):
    //   00 00 00 37  87  00 00 00 00   length, type, correlation id 0
    //   00 00 00 01                    subscription_id 1
    //   00 00 00 03                    partition 3 (v2)
    //   00 00 00 01                    count 1
    //   00 00 00 22 c0 58 8f e0 ...    the record, the same bytes as in version 1
    let deliver_3 = match deliver.clone() {
        Response::Deliver { subscription_id, count, records, .. } => {
            Response::Deliver { subscription_id, partition: 3, count, records }
        }
        other => panic!("{other:?}"),
    };
    assert_eq!(
        hex(&deliver_3.encode_for(2, 0)),
        "00 00 00 37 87 00 00 00 00 00 00 00 01 00 00 00 03 00 00 00 01 00 00 00 22 c0 58 8f e0 00 00 00 00 00 00 00 \
         00 00 06 60 d5 82 db b0 00 00 00 00 00 00 00 00 00 05 68 65 6c 6c 6f"
    );

    // `encode` speaks the newest version, version 2.
    assert_eq!(PROTOCOL_VERSION, 2);
    assert_eq!(ack.encode(2), ack.encode_for(2, 2));
    assert_eq!(deliver.encode(0), deliver.encode_for(2, 0));
}
