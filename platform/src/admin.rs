//! Creates, updates and deletes what a Pipeline owns in NATS, exactly as its layout says. Used by
//! `switchyard run`, by the operator, and by a stage process that finds its consumer missing.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, stream};
use switchyard_crds::layout::{JobsStreamLayout, NatsLayout, TraceStreamLayout};
use switchyard_crds::unit::ConsumerConfig;

/// Why the Pipeline's NATS objects could not be made (or removed) as its layout says.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("the layout names {what} `{value}`, which this runtime does not know")]
    Unknown { what: &'static str, value: String },
    /// The server cannot keep as many copies as `spec.nats.replicas` asks for.
    #[error("spec.nats.replicas is {replicas}, but {reason}: {advice}")]
    Replicas {
        replicas: u32,
        reason: String,
        advice: &'static str,
    },
    #[error("cannot {action}: {source}")]
    Nats {
        action: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl AdminError {
    /// Wraps a NATS error with what was being done.
    fn nats<E: std::error::Error + Send + Sync + 'static>(
        action: String,
    ) -> impl FnOnce(E) -> AdminError {
        move |e| AdminError::Nats {
            action,
            source: Box::new(e),
        }
    }
}

/// The JetStream configuration of a unit's durable pull consumer.
pub fn consumer_config(config: &ConsumerConfig) -> consumer::pull::Config {
    let (filter_subject, filter_subjects) = match config.filter_subjects.as_slice() {
        // One subject goes in the field every server version knows; several need NATS 2.10.
        [one] => (one.clone(), Vec::new()),
        many => (String::new(), many.to_vec()),
    };
    consumer::pull::Config {
        durable_name: Some(config.durable.clone()),
        description: Some("switchyard unit input".to_string()),
        deliver_policy: consumer::DeliverPolicy::All,
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: Duration::from_millis(config.ack_wait_ms),
        // Redelivery is never given up by the server: the runtime dead-letters a message that keeps
        // coming back, with its headers, instead of the server silently dropping it.
        max_deliver: -1,
        max_ack_pending: config.max_ack_pending,
        filter_subject,
        filter_subjects,
        ..Default::default()
    }
}

fn stream_config(layout: &NatsLayout) -> Result<stream::Config, AdminError> {
    let unknown = |what, value: &str| AdminError::Unknown {
        what,
        value: value.to_string(),
    };
    let retention = match layout.stream.retention.as_str() {
        "interest" => stream::RetentionPolicy::Interest,
        "workqueue" => stream::RetentionPolicy::WorkQueue,
        "limits" => stream::RetentionPolicy::Limits,
        other => return Err(unknown("the retention policy", other)),
    };
    let storage = match layout.stream.storage.as_str() {
        "file" => stream::StorageType::File,
        "memory" => stream::StorageType::Memory,
        other => return Err(unknown("the storage type", other)),
    };
    Ok(stream::Config {
        name: layout.stream.name.clone(),
        description: Some("switchyard pipeline data".to_string()),
        subjects: layout.stream.subjects.clone(),
        retention,
        storage,
        num_replicas: layout.stream.replicas as usize,
        duplicate_window: Duration::from_millis(layout.stream.duplicate_window_ms),
        ..Default::default()
    })
}

const REPLICAS_ADVICE: &str =
    "run a JetStream cluster of at least that many servers, or lower spec.nats.replicas";

/// Whether the server can keep `replicas` copies at all: a server that is not part of a cluster keeps
/// one. Said before anything is created, in words a person can act on.
fn check_replicas(client: &async_nats::Client, replicas: u32) -> Result<(), AdminError> {
    if replicas <= 1 {
        return Ok(());
    }
    let info = client.server_info();
    if info.cluster.is_none() {
        return Err(AdminError::Replicas {
            replicas,
            reason: format!(
                "the NATS server {} is not part of a cluster and keeps one copy",
                info.server_name
            ),
            advice: REPLICAS_ADVICE,
        });
    }
    Ok(())
}

/// Creates the stream, the checkpoint bucket and every consumer, or updates them in place. Consumers
/// keep as many copies as the stream (JetStream's default for a consumer that does not say).
pub async fn apply(js: &jetstream::Context, layout: &NatsLayout) -> Result<(), AdminError> {
    check_replicas(&js.client(), layout.stream.replicas)?;
    data_stream(js, layout).await?;
    ensure_checkpoint_bucket(js, &layout.checkpoint_bucket, layout.stream.replicas).await?;
    books_stream(js, layout).await?;
    if let Some(jobs) = &layout.jobs {
        jobs_stream(js, layout, jobs).await?;
    }
    if let Some(trace) = &layout.trace {
        trace_stream(js, layout, trace).await;
    }
    if let Some(bucket) = &layout.join_bucket {
        join_bucket(js, bucket, layout.stream.replicas).await?;
    }
    consumers(js, layout).await
}

/// The bucket where joins keep the parts of the items they wait on: a value per item, and markers
/// of finished ones that expire by themselves (per-message TTLs: NATS 2.11 or later).
pub async fn join_bucket(
    js: &jetstream::Context,
    bucket: &str,
    replicas: u32,
) -> Result<(), AdminError> {
    js.create_or_update_key_value(kv::Config {
        bucket: bucket.to_string(),
        description: "switchyard joins: the parts of the items they wait on".to_string(),
        history: 1,
        storage: stream::StorageType::File,
        num_replicas: replicas as usize,
        limit_markers: Some(std::time::Duration::from_secs(60)),
        ..Default::default()
    })
    .await
    .map_err(AdminError::nats(format!(
        "create or update key-value bucket {bucket} (joins need a NATS server of version 2.11 or later)"
    )))?;
    Ok(())
}

/// The Pipeline's stream, or why the cluster cannot place its copies.
async fn data_stream(js: &jetstream::Context, layout: &NatsLayout) -> Result<(), AdminError> {
    let name = &layout.stream.name;
    let replicas = layout.stream.replicas;
    let config = stream_config(layout)?;
    js.create_or_update_stream(config).await.map_err(|e| {
        use async_nats::jetstream::context::CreateStreamErrorKind;
        use async_nats::jetstream::ErrorCode;
        let code = match e.kind() {
            CreateStreamErrorKind::JetStream(js_error) => Some(js_error.error_code()),
            _ => None,
        };
        match code {
            Some(ErrorCode::INSUFFICIENT_RESOURCES | ErrorCode::STREAM_REPLICAS_NOT_SUPPORTED) => {
                AdminError::Replicas {
                    replicas,
                    reason: format!(
                        "the NATS cluster cannot place {replicas} copies of stream {name} ({e})"
                    ),
                    advice: REPLICAS_ADVICE,
                }
            }
            _ => AdminError::nats(format!("create or update stream {name}"))(e),
        }
    })?;
    Ok(())
}

/// The books: what each unit took in and what became of it.
async fn books_stream(js: &jetstream::Context, layout: &NatsLayout) -> Result<(), AdminError> {
    let books = &layout.books;
    js.create_or_update_stream(stream::Config {
        name: books.name.clone(),
        description: Some("switchyard books: what each unit took in and what became of it".into()),
        subjects: vec![books.filter()],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        num_replicas: layout.stream.replicas as usize,
        // A message delivered again records what it did under the same id: kept once.
        duplicate_window: Duration::from_millis(layout.stream.duplicate_window_ms),
        // Each replica sums its own records into one message now and then.
        allow_rollup: true,
        deny_purge: false,
        ..Default::default()
    })
    .await
    .map_err(AdminError::nats(format!(
        "create or update stream {}",
        books.name
    )))?;
    Ok(())
}

/// The accounts of a followed job's items, kept until its source has written the outcome back.
async fn jobs_stream(
    js: &jetstream::Context,
    layout: &NatsLayout,
    jobs: &JobsStreamLayout,
) -> Result<(), AdminError> {
    js.create_or_update_stream(stream::Config {
        name: jobs.name.clone(),
        description: Some(
            "switchyard jobs: what became of each item of a job its source follows".into(),
        ),
        subjects: vec![format!("{}.>", jobs.prefix)],
        // Kept until the source has written the job's outcome back and acknowledges them.
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::File,
        num_replicas: layout.stream.replicas as usize,
        // An input run again after a crash gives its account under the same id: kept once.
        duplicate_window: Duration::from_millis(layout.stream.duplicate_window_ms),
        ..Default::default()
    })
    .await
    .map_err(AdminError::nats(format!(
        "create or update stream {}",
        jobs.name
    )))?;
    Ok(())
}

/// Trace events are an aid, not data: a server that will not keep them leaves the Pipeline running
/// without them (units publish their events all the same; nobody stores them).
async fn trace_stream(js: &jetstream::Context, layout: &NatsLayout, trace: &TraceStreamLayout) {
    let created = js
        .create_or_update_stream(stream::Config {
            name: trace.name.clone(),
            description: Some("switchyard trace events".to_string()),
            subjects: trace.subjects.clone(),
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            num_replicas: layout.stream.replicas as usize,
            max_age: Duration::from_millis(trace.max_age_ms),
            max_messages: trace.max_messages,
            discard: stream::DiscardPolicy::Old,
            ..Default::default()
        })
        .await;
    if let Err(e) = created {
        tracing::warn!(
            "trace events are not kept: cannot create or update stream {}: {e}",
            trace.name
        );
    }
}

/// Every unit's consumer, and none of a unit that is no longer in the layout (it would keep
/// interest in messages nobody reads).
async fn consumers(js: &jetstream::Context, layout: &NatsLayout) -> Result<(), AdminError> {
    let name = &layout.stream.name;
    let stream = js
        .get_stream(name)
        .await
        .map_err(AdminError::nats(format!("open stream {name}")))?;
    for consumer in &layout.consumers {
        stream
            .create_consumer(consumer_config(consumer))
            .await
            .map_err(AdminError::nats(format!(
                "create or update consumer {} on stream {name}",
                consumer.durable
            )))?;
    }
    let wanted: Vec<&str> = layout
        .consumers
        .iter()
        .map(|c| c.durable.as_str())
        .collect();
    let mut names = stream.consumer_names();
    let mut stale = Vec::new();
    use futures::StreamExt;
    while let Some(name) = names.next().await {
        let consumer = name.map_err(AdminError::nats(format!(
            "list the consumers of {}",
            layout.stream.name
        )))?;
        if !wanted.contains(&consumer.as_str()) {
            stale.push(consumer);
        }
    }
    for consumer in stale {
        stream
            .delete_consumer(&consumer)
            .await
            .map_err(AdminError::nats(format!(
                "delete stale consumer {consumer}"
            )))?;
    }
    Ok(())
}

async fn ensure_checkpoint_bucket(
    js: &jetstream::Context,
    bucket: &str,
    replicas: u32,
) -> Result<(), AdminError> {
    if let Ok(store) = js.get_key_value(bucket).await {
        let current = store
            .status()
            .await
            .map(|s| s.info.config.num_replicas.max(1))
            .unwrap_or(replicas as usize);
        if current == replicas as usize {
            return Ok(());
        }
    }
    js.create_or_update_key_value(kv::Config {
        bucket: bucket.to_string(),
        description: "switchyard source checkpoints".to_string(),
        history: 1,
        storage: stream::StorageType::File,
        num_replicas: replicas as usize,
        ..Default::default()
    })
    .await
    .map_err(AdminError::nats(format!(
        "create or update key-value bucket {bucket}"
    )))?;
    Ok(())
}

/// Deletes the stream (with every message and consumer in it) and the checkpoint bucket. Deleting what
/// is already gone is not an error.
pub async fn delete(js: &jetstream::Context, layout: &NatsLayout) -> Result<(), AdminError> {
    delete_named(js, &layout.stream.name, &layout.checkpoint_bucket).await
}

/// Like `delete`, by name: a Pipeline whose spec no longer plans can still be cleaned up.
pub async fn delete_named(
    js: &jetstream::Context,
    stream: &str,
    bucket: &str,
) -> Result<(), AdminError> {
    match js.delete_stream(stream).await {
        Ok(_) => {}
        Err(e) if is_not_found(&e.to_string()) => {}
        Err(e) => return Err(AdminError::nats(format!("delete stream {stream}"))(e)),
    }
    // Named as `Names::trace_stream`, `books_stream` and `jobs_stream` name them; a Pipeline that
    // never traced has no trace stream, one made before the books no books, one whose sources
    // follow no jobs no jobs stream.
    for other in [
        format!("{stream}_trace"),
        format!("{stream}_books"),
        format!("{stream}_jobs"),
    ] {
        match js.delete_stream(&other).await {
            Ok(_) => {}
            Err(e) if is_not_found(&e.to_string()) => {}
            Err(e) => return Err(AdminError::nats(format!("delete stream {other}"))(e)),
        }
    }
    // The joins' bucket as `Names::join_bucket` names it; most Pipelines have none.
    for bucket in [bucket.to_string(), format!("{stream}_joins")] {
        match js.delete_key_value(&bucket).await {
            Ok(_) => {}
            Err(e) if is_not_found(&e.to_string()) => {}
            Err(e) => {
                return Err(AdminError::nats(format!(
                    "delete key-value bucket {bucket}"
                ))(e))
            }
        }
    }
    Ok(())
}

fn is_not_found(text: &str) -> bool {
    text.contains("not found") || text.contains("10059")
}

/// Creates a unit's consumer, or changes what it reads: a step of a migration.
pub async fn put_consumer(
    js: &jetstream::Context,
    stream: &str,
    consumer: &ConsumerConfig,
) -> Result<(), AdminError> {
    let handle = js
        .get_stream(stream)
        .await
        .map_err(AdminError::nats(format!("open stream {stream}")))?;
    handle
        .create_consumer(consumer_config(consumer))
        .await
        .map_err(AdminError::nats(format!(
            "create or update consumer {} on stream {stream}",
            consumer.durable
        )))?;
    Ok(())
}

/// Deletes a unit's consumer; one already gone is not an error.
pub async fn delete_consumer(
    js: &jetstream::Context,
    stream: &str,
    durable: &str,
) -> Result<(), AdminError> {
    let handle = js
        .get_stream(stream)
        .await
        .map_err(AdminError::nats(format!("open stream {stream}")))?;
    match handle.delete_consumer(durable).await {
        Ok(_) => Ok(()),
        Err(e) if is_not_found(&e.to_string()) => Ok(()),
        Err(e) => Err(AdminError::nats(format!("delete consumer {durable}"))(e)),
    }
}

/// Messages the stream still holds on `subject` (with interest retention: not yet acknowledged by
/// every consumer that reads it).
pub async fn messages_on(
    js: &jetstream::Context,
    stream: &str,
    subject: &str,
) -> Result<u64, AdminError> {
    use futures::StreamExt;
    let handle = js
        .get_stream(stream)
        .await
        .map_err(AdminError::nats(format!("open stream {stream}")))?;
    let mut subjects = handle
        .info_with_subjects(subject)
        .await
        .map_err(AdminError::nats(format!("count the messages on {subject}")))?;
    let mut total = 0u64;
    while let Some(entry) = subjects.next().await {
        let (_, count) =
            entry.map_err(AdminError::nats(format!("count the messages on {subject}")))?;
        total += count as u64;
    }
    Ok(total)
}

/// Pending plus unacknowledged messages of a unit's consumer; None when it does not exist.
pub async fn queue_of(
    js: &jetstream::Context,
    stream: &str,
    durable: &str,
) -> Result<Option<u64>, AdminError> {
    let handle = js
        .get_stream(stream)
        .await
        .map_err(AdminError::nats(format!("open stream {stream}")))?;
    match handle.consumer_info(durable).await {
        Ok(info) => Ok(Some(info.num_pending + info.num_ack_pending as u64)),
        Err(e) if is_not_found(&e.to_string()) => Ok(None),
        Err(e) => Err(AdminError::nats(format!("read consumer {durable}"))(e)),
    }
}

/// The items a join unit waits on in the Pipeline's joins bucket, with those whose failure or
/// timeout a replica has not carried out yet: what a join that goes away finishes first. None when
/// the Pipeline has no joins bucket.
pub async fn join_waiting(
    js: &jetstream::Context,
    stream: &str,
    unit: &str,
) -> Result<Option<u64>, AdminError> {
    use switchyard_crds::join_state::Entry;
    let bucket = format!("{stream}_joins");
    let store = match js.get_key_value(&bucket).await {
        Ok(store) => store,
        Err(e) if is_not_found(&e.to_string()) => return Ok(None),
        Err(e) => {
            return Err(AdminError::nats(format!("open key-value bucket {bucket}"))(
                e,
            ))
        }
    };
    let what = || format!("read the items join {unit} waits on");
    let mut keys = store.keys().await.map_err(AdminError::nats(what()))?;
    use futures::StreamExt;
    let prefix = format!("{unit}.");
    let mut waiting = 0;
    while let Some(key) = keys.next().await {
        let key = key.map_err(AdminError::nats(what()))?;
        if !key.starts_with(&prefix) {
            continue;
        }
        let value = store.get(&key).await.map_err(AdminError::nats(what()))?;
        let entry = value.and_then(|v: bytes::Bytes| serde_json::from_slice::<Entry>(&v).ok());
        if entry.is_some_and(|e| e.state.open()) {
            waiting += 1;
        }
    }
    Ok(Some(waiting))
}

/// What a migration without drain would drop, as "N messages in <where>", for those that hold any.
pub async fn held_in(
    js: &jetstream::Context,
    stream: &str,
    discards: &[switchyard_crds::migration::Discard],
) -> Result<Vec<String>, AdminError> {
    use switchyard_crds::migration::Discard;
    let mut found = Vec::new();
    for discard in discards {
        let held = match discard {
            Discard::Queue { unit } => queue_of(js, stream, unit).await?.unwrap_or(0),
            Discard::Subject { subject } => messages_on(js, stream, subject).await?,
        };
        if held > 0 {
            found.push(format!("{held} messages in {discard}"));
        }
    }
    Ok(found)
}
