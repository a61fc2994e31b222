//! The raw limit: the least an async-nats program must do to move messages the way a unit does —
//! pull batches from the unit's consumer, publish each message downstream with a message id, and
//! acknowledge each input once the stream has acknowledged its output — written to be fast: pulls and
//! publishes pipelined, nothing else. `switchyard-bench` runs it as its own process
//! (`switchyard-bench raw`), on one thread like a stage process.

use std::path::PathBuf;

use anyhow::Context as _;
use async_nats::jetstream::consumer::PullConsumer;
use futures::StreamExt;
use switchyard_crds::unit::{headers, UnitConfig};

#[derive(clap::Args, Debug)]
pub struct RawArgs {
    #[arg(long)]
    pub config: PathBuf,
    #[arg(long)]
    pub nats_url: String,
}

/// Messages asked for per pull request.
const BATCH: usize = 500;
/// Publishes waiting for their acknowledgement at once.
const WINDOW: usize = 1000;

pub fn main(args: RawArgs) -> std::process::ExitCode {
    match switchyard_platform::logging::block_on(None, run(args)) {
        Ok(Ok(())) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            std::process::ExitCode::FAILURE
        }
        Ok(Err(e)) => {
            eprintln!("switchyard-bench raw: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: RawArgs) -> anyhow::Result<()> {
    let config: UnitConfig = serde_json::from_slice(&std::fs::read(&args.config)?)?;
    let input = config.input.context("the unit reads nothing")?;
    let output = config.output_subject.context("the unit writes nothing")?;
    let client = async_nats::connect(&args.nats_url).await?;
    let js = switchyard_platform::nats::jetstream_context(client.clone());
    let stream = js.get_stream(&config.stream).await?;
    let consumer: PullConsumer = stream
        .get_consumer(&input.durable)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let subject = async_nats::Subject::from(output.as_str());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    // Pulls stay pipelined (the next batch is asked for while this one is worked on), and so do the
    // publishes: up to WINDOW wait for their acknowledgement while more go out.
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(BATCH)
        .messages()
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut in_flight = futures::stream::FuturesUnordered::new();
    loop {
        tokio::select! {
            biased;
            _ = term.recv() => break,
            Some(done) = in_flight.next(), if !in_flight.is_empty() => {
                let message: async_nats::jetstream::Message = done?;
                message.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
            }
            next = messages.next(), if in_flight.len() < WINDOW => {
                let Some(message) = next else { break };
                let message = message.map_err(|e| anyhow::anyhow!("{e}"))?;
                let id = message
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(headers::MSG_ID))
                    .map(|v| format!("{}/raw", v.as_str()))
                    .unwrap_or_default();
                let mut map = async_nats::HeaderMap::new();
                map.insert(headers::MSG_ID, id.as_str());
                let ack = js
                    .publish_with_headers(subject.clone(), map, message.payload.clone())
                    .await?;
                in_flight.push(async move {
                    ack.await?;
                    Ok::<_, anyhow::Error>(message)
                });
            }
        }
    }
    client.flush().await?;
    Ok(())
}
