//! End-to-end tests against the real paraphymd (see tests/src/lib.rs).

mod batching;
mod cli;
mod context;
mod conversations;
mod faults;
mod health;
mod http;
mod json;
mod lifecycle;
mod memory;
mod models;
mod progress;
mod scaling;
mod soak;
mod streaming;
mod tui;
