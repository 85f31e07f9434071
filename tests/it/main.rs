//! End-to-end tests against the real paraphymd (see tests/src/lib.rs).

mod cli;
mod faults;
mod lifecycle;
mod streaming;
