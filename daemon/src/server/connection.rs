//! One connection: this thread reads and dispatches requests; a writer
//! thread owns the socket's sending side and empties the outbox. Nothing
//! here runs model code: generations are handed to worker pools.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use interprocess::local_socket::{traits::Stream as _, Stream};
use interprocess::TryClone;
use paraphym_protocol::frame::{self, FrameError};
use paraphym_protocol::message::{ClientMsg, ErrorKind, HealthReport, Request, Response};
use paraphym_protocol::{codec, handshake};

use super::{CancelReason, Conn, Daemon, JobControl, Outbox, Reply};
use crate::pool::Job;

/// A peer that connects and says nothing is dropped after this long.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

pub fn serve(mut stream: Stream, daemon: Arc<Daemon>) {
    let _ = stream.set_recv_timeout(Some(HANDSHAKE_TIMEOUT));
    let theirs = match handshake::read_client_hello(&mut stream) {
        Ok(v) => v,
        Err(e) => {
            tracing::debug!("handshake refused: {e}");
            return;
        }
    };
    let (writer_stream, control) = match (stream.try_clone(), stream.try_clone()) {
        (Ok(w), Ok(c)) => (w, c),
        (Err(e), _) | (_, Err(e)) => {
            tracing::warn!("cannot clone a connection's socket: {e}");
            return;
        }
    };
    let conn = Arc::new(Conn {
        id: daemon.next_conn.fetch_add(1, Ordering::Relaxed),
        outbox: Outbox::new(daemon.config.outbox_bytes),
        jobs: Mutex::default(),
        socket: control,
    });
    // The slot is taken before the client hears the answer: a client that
    // has its answer is counted, so one that connects later can't overtake
    // it and push it over the limit.
    let over_limit = {
        let mut conns = daemon.lock_conns();
        let over = conns.len() >= daemon.config.max_connections;
        if !over {
            conns.insert(conn.id, conn.clone());
        }
        over
    };
    if let Err(e) = handshake::answer(&mut stream, theirs) {
        tracing::debug!("handshake refused: {e}");
        daemon.lock_conns().remove(&conn.id);
        return;
    }
    let _ = stream.set_recv_timeout(None);
    // The write timeout: a client that stops reading for this long is cut off.
    let _ = stream.set_send_timeout(Some(daemon.config.write_timeout));
    let writer = {
        let conn = conn.clone();
        let daemon = daemon.clone();
        std::thread::Builder::new()
            .name("conn-writer".into())
            .spawn(move || write_loop(writer_stream, &conn, &daemon))
    };
    let Ok(writer) = writer else {
        tracing::error!("cannot start a writer thread");
        daemon.lock_conns().remove(&conn.id);
        return;
    };
    tracing::debug!(conn = conn.id, "connected");
    // Whatever happens below (a panic included), the connection is closed
    // and forgotten.
    struct Guard<'a>(&'a Arc<Conn>, &'a Daemon);
    impl Drop for Guard<'_> {
        fn drop(&mut self) {
            self.0.cancel_all(CancelReason::Disconnected);
            self.0.outbox.close();
            self.0.shutdown_socket();
            self.1.lock_conns().remove(&self.0.id);
        }
    }
    let guard = Guard(&conn, &daemon);
    if over_limit {
        let reply = Reply {
            id: 0,
            conn: conn.clone(),
        };
        reply.error(
            ErrorKind::Busy,
            format!(
                "the daemon serves at most {} connections at once; try again later",
                daemon.config.max_connections
            ),
        );
        conn.outbox.drain();
    } else {
        read_loop(stream, &conn, &daemon);
    }
    let _ = writer.join();
    drop(guard);
    tracing::debug!(conn = conn.id, "disconnected");
}

fn read_loop(mut stream: Stream, conn: &Arc<Conn>, daemon: &Arc<Daemon>) {
    loop {
        let payload = match frame::read_frame(&mut stream) {
            Ok(p) => p,
            Err(FrameError::TooLarge(n)) => {
                // The length can't be trusted, so neither can anything after it.
                tracing::warn!(conn = conn.id, "frame of {n} bytes: closing");
                let reply = Reply {
                    id: 0,
                    conn: conn.clone(),
                };
                reply.error(
                    ErrorKind::BadRequest,
                    format!(
                        "frame of {n} bytes is over the {}-byte limit; closing the connection",
                        paraphym_protocol::MAX_FRAME_BYTES
                    ),
                );
                conn.cancel_all(CancelReason::Disconnected);
                conn.outbox.drain();
                return;
            }
            Err(e) => {
                if !matches!(e, FrameError::Closed) {
                    tracing::debug!(conn = conn.id, "read: {e}");
                }
                // Gone (or cut off): its generations stop, nothing more is sent.
                conn.cancel_all(CancelReason::Disconnected);
                conn.outbox.close();
                return;
            }
        };
        let received = Instant::now();
        match codec::decode::<ClientMsg>(&payload) {
            Ok(msg) => dispatch(msg, received, conn, daemon),
            Err(e) => {
                // The frame boundary is intact, so the connection still is:
                // answer (with the id, when the frame has one) and go on.
                let id = payload
                    .get(..8)
                    .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
                    .unwrap_or(0);
                tracing::debug!(conn = conn.id, "undecodable message: {e}");
                Reply {
                    id,
                    conn: conn.clone(),
                }
                .error(
                    ErrorKind::BadRequest,
                    format!("undecodable message ({e}); see docs/PROTOCOL.md"),
                );
            }
        }
    }
}

fn write_loop(mut stream: Stream, conn: &Conn, daemon: &Daemon) {
    use std::io::Write;
    while let Some(batch) = conn.outbox.take_batch() {
        if let Err(e) = stream.write_all(&batch) {
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) {
                tracing::warn!(
                    conn = conn.id,
                    "client has not read for {:?}: cancelling its requests and closing",
                    daemon.config.write_timeout
                );
                conn.cancel_all(CancelReason::SlowClient);
            } else {
                tracing::debug!(conn = conn.id, "write: {e}");
                conn.cancel_all(CancelReason::Disconnected);
            }
            conn.outbox.close();
            break;
        }
    }
    // Done writing: wake the reader too.
    conn.shutdown_socket();
}

fn dispatch(msg: ClientMsg, received: Instant, conn: &Arc<Conn>, daemon: &Arc<Daemon>) {
    let reply = Reply {
        id: msg.id,
        conn: conn.clone(),
    };
    if daemon.is_shutting_down() && !matches!(msg.request, Request::Cancel { .. }) {
        reply.error(ErrorKind::ShuttingDown, "the daemon is shutting down");
        return;
    }
    match msg.request {
        Request::Generate(g) => {
            let request = match super::convert::generation(&g) {
                Ok(r) => r,
                Err(e) => {
                    reply.send(Response::Error(e));
                    return;
                }
            };
            let control = Arc::new(JobControl::default());
            {
                let mut jobs = conn.lock_jobs();
                if jobs.contains_key(&msg.id) {
                    drop(jobs);
                    reply.error(
                        ErrorKind::BadRequest,
                        format!("request id {} is already in use on this connection", msg.id),
                    );
                    return;
                }
                jobs.insert(msg.id, control.clone());
            }
            // Shutdown may have cancelled every job just before this one was
            // registered: the flag is set first, so this check catches it.
            if daemon.is_shutting_down() {
                control.cancel(CancelReason::Shutdown);
            }
            let job = Job {
                request,
                control,
                reply: reply.clone(),
                received,
                trial: false,
                seq: 0,
            };
            daemon
                .pools
                .submit(g.model.as_deref(), g.keep_alive_ms, job);
        }
        Request::Cancel { target } => {
            // Unknown or finished targets are ignored: the race is normal.
            let job = conn.lock_jobs().get(&target).cloned();
            if let Some(job) = job {
                job.cancel(CancelReason::Client);
                // Still queued: answer now rather than after the generations
                // ahead of it (the worker skips a claimed job).
                if job.claim() {
                    let r = Reply {
                        id: target,
                        conn: conn.clone(),
                    };
                    r.finish();
                    r.post(Response::Done(crate::pool::cancelled_stats()));
                }
            }
        }
        Request::ListModels => {
            reply.send(Response::Models(daemon.pools.list_models()));
        }
        Request::Status => {
            reply.send(Response::Status(daemon.pools.status()));
        }
        Request::Load {
            model,
            keep_alive_ms,
            context,
        } => match context {
            Some(0) => {
                reply.error(
                    ErrorKind::BadRequest,
                    "context (num_ctx) must be at least 1",
                );
            }
            _ => daemon
                .pools
                .load(&model, keep_alive_ms, context.map(|c| c as usize), reply),
        },
        Request::Unload { model } => daemon.pools.unload(&model, reply),
        Request::Health => {
            let models = daemon.pools.health();
            reply.send(Response::Health(HealthReport {
                ok: models.iter().all(|m| m.ok),
                uptime_ms: daemon.started.elapsed().as_millis() as u64,
                version: env!("CARGO_PKG_VERSION").to_owned(),
                models,
            }));
        }
        Request::Subscribe => daemon.events.subscribe(reply),
        Request::Pull { model } => daemon.pools.pull(&model, reply),
        Request::Show { model } => match daemon.pools.show(&model) {
            Ok(d) => {
                reply.send(Response::Details(d));
            }
            Err(e) => {
                reply.send(Response::Error(e));
            }
        },
        Request::Remove { model } => daemon.pools.remove(&model, reply),
        Request::Shutdown => {
            tracing::info!(conn = conn.id, "shutdown requested");
            reply.error(ErrorKind::ShuttingDown, "the daemon is shutting down");
            daemon.request_stop();
        }
    }
}
