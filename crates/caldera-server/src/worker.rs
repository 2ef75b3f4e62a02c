//! The model thread: owns the one [`Generator`] and runs queued jobs one at a time.
//!
//! Jobs arrive through a bounded channel. Each job carries a cancel flag; the runner is
//! wrapped so that every `forward` call (one per token) first checks the flag of the job
//! in progress, which makes a cancelled job stop within one token. A panic inside a
//! job's generation is caught: that job gets an error and the generator is rebuilt from
//! the runner factory, since the runner's state is unknown after a panic.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use caldera_engine::{FinishReason, GenParams, Generator};
use caldera_model::{Logits, RunError, Runner};
use caldera_tokenizer::Tokenizer;
use tokio::sync::mpsc::UnboundedSender;

/// Makes a fresh runner (one empty sequence).
pub type RunnerFactory = Box<dyn FnMut() -> Result<Box<dyn Runner>, RunError> + Send>;

/// What the worker tells a request.
#[derive(Debug)]
pub enum Event {
    /// Whole UTF-8 text, in order.
    Text(String),
    /// Generation ended normally.
    Done {
        prompt_tokens: usize,
        completion_tokens: usize,
        finish: FinishReason,
    },
    /// Generation failed (backend error, or a caught panic).
    Error(String),
}

pub struct Job {
    pub prompt: Vec<u32>,
    pub params: GenParams,
    pub events: UnboundedSender<Event>,
    pub cancel: Arc<AtomicBool>,
}

/// Shared between the worker and the HTTP side.
#[derive(Default)]
pub struct WorkerState {
    /// Jobs sent and not yet picked up.
    pub queued: AtomicUsize,
    /// Whether a job is running.
    pub busy: AtomicBool,
    /// False once the worker thread has ended.
    pub alive: AtomicBool,
    /// The cancel flag of the job in progress.
    pub current: Mutex<Option<Arc<AtomicBool>>>,
}

/// A runner that refuses to run once the current job is cancelled.
struct Cancellable {
    inner: Box<dyn Runner>,
    state: Arc<WorkerState>,
}

const CANCELLED: &str = "cancelled";

impl Runner for Cancellable {
    fn capacity(&self) -> usize {
        self.inner.capacity()
    }
    fn len(&self) -> usize {
        self.inner.len()
    }
    fn truncate(&mut self, n: usize) -> bool {
        self.inner.truncate(n)
    }
    fn forward(
        &mut self,
        tokens: &[u32],
        logits: Logits,
        out: &mut Vec<f32>,
    ) -> Result<(), RunError> {
        let cancelled = self
            .state
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|c| c.load(Ordering::Relaxed));
        if cancelled {
            return Err(CANCELLED.into());
        }
        self.inner.forward(tokens, logits, out)
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_owned()
    }
}

/// Runs jobs until the channel closes. `gen` was built from `factory` by the caller.
pub fn run(
    rx: mpsc::Receiver<Job>,
    tok: Arc<Tokenizer>,
    mut factory: RunnerFactory,
    first: Box<dyn Runner>,
    state: Arc<WorkerState>,
) {
    struct Alive(Arc<WorkerState>);
    impl Drop for Alive {
        fn drop(&mut self) {
            self.0.alive.store(false, Ordering::SeqCst);
        }
    }
    state.alive.store(true, Ordering::SeqCst);
    let _alive = Alive(state.clone());
    let wrap = |r: Box<dyn Runner>| {
        Generator::new(Box::new(Cancellable {
            inner: r,
            state: state.clone(),
        }))
    };
    let mut gen = Some(wrap(first));
    while let Ok(job) = rx.recv() {
        state.queued.fetch_sub(1, Ordering::SeqCst);
        if job.cancel.load(Ordering::Relaxed) {
            continue;
        }
        let g = match gen.as_mut() {
            Some(g) => g,
            None => match catch_unwind(AssertUnwindSafe(&mut factory)) {
                Ok(Ok(r)) => gen.insert(wrap(r)),
                Ok(Err(e)) => {
                    let _ = job
                        .events
                        .send(Event::Error(format!("cannot restart the model: {e}")));
                    continue;
                }
                Err(p) => {
                    let _ = job.events.send(Event::Error(format!(
                        "cannot restart the model: {}",
                        panic_message(&*p)
                    )));
                    continue;
                }
            },
        };
        *state.current.lock().unwrap_or_else(|e| e.into_inner()) = Some(job.cancel.clone());
        state.busy.store(true, Ordering::SeqCst);
        let result = catch_unwind(AssertUnwindSafe(|| {
            g.generate(&tok, &job.prompt, &job.params, |text| {
                if job.events.send(Event::Text(text.to_owned())).is_err() {
                    job.cancel.store(true, Ordering::Relaxed);
                }
            })
        }));
        state.busy.store(false, Ordering::SeqCst);
        *state.current.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let event = match result {
            Ok(Ok(stats)) => Event::Done {
                prompt_tokens: stats.prompt_tokens,
                completion_tokens: stats.generated_tokens,
                finish: stats.finish,
            },
            Ok(Err(_)) if job.cancel.load(Ordering::Relaxed) => continue,
            Ok(Err(e)) => Event::Error(format!("generation failed: {e}")),
            Err(p) => {
                gen = None;
                Event::Error(format!(
                    "internal error during generation: {}",
                    panic_message(&*p)
                ))
            }
        };
        let _ = job.events.send(event);
    }
}
