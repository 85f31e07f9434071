//! What the daemon's engine is doing, mirrored from its event stream: every
//! worker of every loaded model, queues, breakers, memory, and throughput
//! over a fixed window.

use std::collections::VecDeque;

use paraphym_protocol::message::{
    BreakerState, Event, Metrics, StatusReport, WorkerSnapshot, WorkerState,
};

/// The throughput chart's window (seconds), as bottom's default.
pub const WINDOW_S: f64 = 120.0;
/// How many of our own time-to-first-token figures the sparkline keeps.
pub const TTFT_KEPT: usize = 60;
const NOTES_KEPT: usize = 4;

#[derive(Debug, Clone, PartialEq)]
pub struct WorkerView {
    pub id: u32,
    pub state: WorkerState,
    pub tokens_per_s: f32,
    pub served: u64,
    /// Requests it decodes together now, of the most it takes.
    pub sequences: u32,
    pub batch: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelView {
    /// The daemon's reference (usually the file's path).
    pub reference: String,
    pub workers: Vec<WorkerView>,
    pub queued: u32,
    pub tokens_per_s: f32,
    pub breaker: BreakerState,
    pub memory_bytes: u64,
    /// (seconds since the daemon started, tokens/s), oldest first.
    pub history: VecDeque<(f64, f64)>,
}

impl ModelView {
    fn new(reference: &str) -> Self {
        Self {
            reference: reference.to_owned(),
            workers: Vec::new(),
            queued: 0,
            tokens_per_s: 0.0,
            breaker: BreakerState::Closed,
            memory_bytes: 0,
            history: VecDeque::new(),
        }
    }

    /// The file name without its folders and `.gguf`.
    pub fn name(&self) -> &str {
        short_name(&self.reference)
    }

    fn upsert(&mut self, w: &WorkerSnapshot) {
        match self.workers.iter_mut().find(|v| v.id == w.id) {
            Some(v) => {
                v.state = w.state;
                v.tokens_per_s = w.tokens_per_s;
                v.served = w.requests_served;
                v.sequences = w.sequences;
                v.batch = w.batch;
            }
            None => {
                self.workers.push(WorkerView {
                    id: w.id,
                    state: w.state,
                    tokens_per_s: w.tokens_per_s,
                    served: w.requests_served,
                    sequences: w.sequences,
                    batch: w.batch,
                });
                self.workers.sort_by_key(|v| v.id);
            }
        }
        // A stopped worker is gone; keep the list to the living.
        self.workers.retain(|v| v.state != WorkerState::Stopped);
    }
}

pub fn short_name(reference: &str) -> &str {
    let base = reference.rsplit('/').next().unwrap_or(reference);
    base.strip_suffix(".gguf").unwrap_or(base)
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct EngineState {
    pub models: Vec<ModelView>,
    pub memory_used: u64,
    pub memory_estimated: u64,
    pub memory_budget: u64,
    /// The newest sample's time (seconds since the daemon started).
    pub now_s: f64,
    /// Our own replies' time to first token (ms), oldest first.
    pub ttft_ms: VecDeque<u64>,
    /// Recent evictions and breaker changes, newest last.
    pub notes: VecDeque<String>,
}

impl EngineState {
    fn model(&mut self, reference: &str) -> &mut ModelView {
        match self.models.iter().position(|m| m.reference == reference) {
            Some(i) => &mut self.models[i],
            None => {
                self.models.push(ModelView::new(reference));
                self.models.sort_by(|a, b| a.reference.cmp(&b.reference));
                let i = self
                    .models
                    .iter()
                    .position(|m| m.reference == reference)
                    .expect("just added");
                &mut self.models[i]
            }
        }
    }

    fn note(&mut self, text: String) {
        self.notes.push_back(text);
        while self.notes.len() > NOTES_KEPT {
            self.notes.pop_front();
        }
    }

    /// Forget the models a report no longer lists (unloaded meanwhile).
    fn keep_only<'a>(&mut self, listed: impl Iterator<Item = &'a str>) {
        let listed: Vec<&str> = listed.collect();
        self.models
            .retain(|v| listed.contains(&v.reference.as_str()));
    }

    /// A full picture (on connect, and whenever asked).
    pub fn apply_status(&mut self, s: &StatusReport) {
        self.memory_used = s.memory_used_bytes;
        self.memory_budget = s.memory_budget_bytes;
        self.memory_estimated = s.memory_estimated_bytes;
        self.keep_only(s.models.iter().map(|n| n.reference.as_str()));
        for ms in &s.models {
            let m = self.model(&ms.reference);
            m.queued = ms.queued;
            m.memory_bytes = ms.memory_bytes;
            m.workers.clear();
            for w in &ms.workers {
                m.upsert(w);
            }
        }
        for f in &s.faults {
            if let Some(m) = self.models.iter_mut().find(|m| m.reference == f.model) {
                m.breaker = f.breaker;
            }
        }
    }

    pub fn apply(&mut self, e: &Event) {
        match e {
            Event::Worker { model, worker } => self.model(model).upsert(worker),
            Event::Breaker {
                model,
                state,
                message,
            } => {
                self.model(model).breaker = *state;
                let what = match state {
                    BreakerState::Open => format!("breaker open: {message}"),
                    BreakerState::HalfOpen => "breaker half-open: one trial".into(),
                    BreakerState::Closed => "breaker closed".into(),
                };
                self.note(format!("{}: {what}", short_name(model)));
            }
            Event::ModelUnloaded { model, reason } => {
                self.models.retain(|m| &m.reference != model);
                self.note(format!("{} unloaded: {reason}", short_name(model)));
            }
            Event::Metrics(m) => self.apply_metrics(m),
            Event::Throughput { .. } => {}
        }
    }

    fn apply_metrics(&mut self, m: &Metrics) {
        let at = m.at_ms as f64 / 1e3;
        if at < self.now_s {
            // Time went back: a new daemon. Its clock starts again.
            for v in &mut self.models {
                v.history.clear();
            }
        }
        self.now_s = at;
        self.memory_used = m.memory_used_bytes;
        self.memory_estimated = m.memory_estimated_bytes;
        let now = self.now_s;
        self.keep_only(m.models.iter().map(|n| n.reference.as_str()));
        for mm in &m.models {
            let v = self.model(&mm.reference);
            v.queued = mm.queued;
            v.tokens_per_s = mm.tokens_per_s;
            v.breaker = mm.breaker;
            v.history.push_back((now, f64::from(mm.tokens_per_s)));
            while v.history.front().is_some_and(|(t, _)| *t < now - WINDOW_S) {
                v.history.pop_front();
            }
            // The sample is the truth about which workers exist.
            v.workers
                .retain(|w| mm.workers.iter().any(|n| n.id == w.id));
            for w in &mm.workers {
                match v.workers.iter_mut().find(|x| x.id == w.id) {
                    Some(x) => {
                        x.state = w.state;
                        x.tokens_per_s = w.tokens_per_s;
                        x.sequences = w.sequences;
                        x.batch = w.batch;
                    }
                    None => v.workers.push(WorkerView {
                        id: w.id,
                        state: w.state,
                        tokens_per_s: w.tokens_per_s,
                        served: 0,
                        sequences: w.sequences,
                        batch: w.batch,
                    }),
                }
            }
            v.workers.sort_by_key(|x| x.id);
        }
    }

    pub fn record_ttft(&mut self, ms: f64) {
        self.ttft_ms.push_back(ms.round().max(0.0) as u64);
        while self.ttft_ms.len() > TTFT_KEPT {
            self.ttft_ms.pop_front();
        }
    }

    pub fn total_tokens_per_s(&self) -> f32 {
        // A fold from +0.0: an empty float sum is -0.0 ("-0.0 tok/s").
        self.models.iter().fold(0.0, |a, m| a + m.tokens_per_s)
    }

    pub fn queued(&self) -> u32 {
        self.models.iter().map(|m| m.queued).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use paraphym_protocol::message::{ModelMetrics, WorkerMetrics};

    fn snap(id: u32, state: WorkerState) -> WorkerSnapshot {
        WorkerSnapshot {
            id,
            state,
            requests_served: 0,
            tokens_per_s: 0.0,
            sequences: u32::from(state == WorkerState::Busy),
            batch: 8,
        }
    }

    fn metrics(at_ms: u64, tps: f32, workers: &[(u32, WorkerState)]) -> Event {
        Event::Metrics(Metrics {
            at_ms,
            memory_used_bytes: 100,
            memory_estimated_bytes: 80,
            models: vec![ModelMetrics {
                reference: "/m/qwen3.gguf".into(),
                queued: 1,
                tokens_per_s: tps,
                breaker: BreakerState::Closed,
                workers: workers
                    .iter()
                    .map(|&(id, state)| WorkerMetrics {
                        id,
                        state,
                        tokens_per_s: tps,
                        sequences: u32::from(state == WorkerState::Busy),
                        batch: 8,
                    })
                    .collect(),
            }],
        })
    }

    #[test]
    fn worker_events_update_states_and_stopped_workers_leave() {
        let mut e = EngineState::default();
        let model = "/m/qwen3.gguf".to_string();
        for (id, st) in [
            (1, WorkerState::Spawning),
            (1, WorkerState::Loading),
            (2, WorkerState::Spawning),
            (1, WorkerState::Idle),
            (1, WorkerState::Busy),
        ] {
            e.apply(&Event::Worker {
                model: model.clone(),
                worker: snap(id, st),
            });
        }
        assert_eq!(e.models.len(), 1);
        assert_eq!(e.models[0].name(), "qwen3");
        let states: Vec<_> = e.models[0].workers.iter().map(|w| w.state).collect();
        assert_eq!(states, [WorkerState::Busy, WorkerState::Spawning]);
        e.apply(&Event::Worker {
            model: model.clone(),
            worker: snap(2, WorkerState::Stopped),
        });
        assert_eq!(e.models[0].workers.len(), 1);
        e.apply(&Event::ModelUnloaded {
            model,
            reason: "keep-alive expired".into(),
        });
        assert!(e.models.is_empty());
        assert_eq!(
            e.notes.back().unwrap(),
            "qwen3 unloaded: keep-alive expired"
        );
    }

    #[test]
    fn metrics_build_a_window_of_throughput_and_replace_the_worker_list() {
        let mut e = EngineState::default();
        for s in 0..200u64 {
            e.apply(&metrics(s * 1000, s as f32, &[(1, WorkerState::Busy)]));
        }
        let m = &e.models[0];
        assert_eq!(m.history.len(), 121, "the last 120 s, ends included");
        assert_eq!(m.history.back(), Some(&(199.0, 199.0)));
        assert_eq!(m.queued, 1);
        e.apply(&metrics(200_000, 0.0, &[(3, WorkerState::Idle)]));
        let ids: Vec<_> = e.models[0].workers.iter().map(|w| w.id).collect();
        assert_eq!(ids, [3]);
        assert_eq!(e.memory_used, 100);
        // A restarted daemon's clock starts again: the old window goes.
        e.apply(&metrics(1_000, 5.0, &[(0, WorkerState::Idle)]));
        assert_eq!(e.models[0].history, [(1.0, 5.0)]);
    }

    #[test]
    fn ttft_keeps_the_last_sixty() {
        let mut e = EngineState::default();
        for i in 0..100 {
            e.record_ttft(f64::from(i));
        }
        assert_eq!(e.ttft_ms.len(), TTFT_KEPT);
        assert_eq!(e.ttft_ms.front(), Some(&40));
    }
}
