//! Units that read: process units (steps, then publish downstream) and sinks (write out).
//!
//! One task pulls from the unit's durable consumer and keeps up to `concurrency` inputs in flight. Each
//! input runs through the steps; its outputs are published with ids derived from the input's id; the
//! input is acknowledged only once every output (and every dead letter) is stored.
//!
//! The rooms: `pull` (the loop), `acknowledge` (an input from start to its ack), `items` (through
//! the steps), `emit` (outputs and what they wait on), `dead_letters`, `jobs` (accounts of
//! followed jobs), `spans` (sampled items); `worker` says what a unit is made of.

mod acknowledge;
mod branch;
mod dead_letters;
mod emit;
mod input;
mod items;
mod jobs;
mod joining;
mod pull;
mod spans;
mod worker;

pub use worker::{ConsumeError, Jobs, Output, Worker};
