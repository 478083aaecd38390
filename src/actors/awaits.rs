//! Awaiting one execution's completion: one shared subscription per backend serves every
//! pending await ([`AwaitHub`]), however many there are.
//!
//! The hub's subscription is a filter like any other, whose sink ([`AwaitSink`]) hands each
//! completion to the awaits registered for its execution and records how far the subscription
//! has been offered events (`seen`). An await registers itself and reads `seen` under one lock,
//! so every completion above `seen` reaches it through the subscription. Completions at or
//! below `seen` and above the await's own position (taken before the work was submitted) have
//! passed the hub already: the await reads them back from the backend (batched, through the
//! shared pool), from its position up to `seen`, and stops at its execution's completion. An
//! await whose position is `seen` itself ([`CompletionSupervisorHandle::watch_completion`]) reads
//! nothing.
//!
//! A pending await costs one map entry and a oneshot channel; dropping its future removes the
//! entry (timeouts and cancellation are the caller's `tokio` tools).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::sync::oneshot;

use super::sink::{Sent, Sink};
use crate::backends::lazy::LazySource;
use crate::backends::{CompletionSource, FamilyEvent, Positioned, StartAt};
use crate::cursor::{Frontier, StreamCursor};
use crate::error::Error;
use crate::event::CompletionEvent;
use crate::family::Family;
use crate::types::ExecutionId;

/// What an await receives: its execution's completion, or why the hub's subscription ended.
type Outcome = Result<CompletionEvent, Error>;

/// One pending await.
struct Waiter {
    token: u64,
    tx: oneshot::Sender<Outcome>,
}

/// The awaits of one execution: nearly always one.
enum Waiters {
    One(Waiter),
    Many(Vec<Waiter>),
}

impl Waiters {
    fn push(&mut self, waiter: Waiter) {
        match self {
            Self::Many(all) => all.push(waiter),
            Self::One(_) => {
                let Self::One(first) = std::mem::replace(self, Self::Many(Vec::with_capacity(2))) else { return };
                if let Self::Many(all) = self {
                    all.extend([first, waiter]);
                }
            }
        }
    }

    /// Removes the await `token`; `true` when none is left.
    fn remove(&mut self, token: u64) -> bool {
        match self {
            Self::One(w) => w.token == token,
            Self::Many(all) => {
                all.retain(|w| w.token != token);
                all.is_empty()
            }
        }
    }

    fn send(self, outcome: &Outcome) {
        match self {
            Self::One(w) => {
                let _ = w.tx.send(outcome.clone());
            }
            Self::Many(all) => {
                for w in all {
                    let _ = w.tx.send(outcome.clone());
                }
            }
        }
    }
}

#[derive(Default)]
struct HubState {
    waiters: HashMap<ExecutionId, Waiters>,
    /// How far the subscription has offered events (`None`: not started, or ended).
    seen: Option<Frontier>,
}

/// The awaits of one backend and their shared subscription (see the module docs).
pub(crate) struct AwaitHub {
    source: Arc<LazySource>,
    /// Rows per read back.
    batch_size: usize,
    state: Mutex<HubState>,
    next_token: AtomicU64,
    /// Held while the shared subscription is being started, so concurrent first awaits start
    /// one.
    starting: tokio::sync::Mutex<()>,
}

impl AwaitHub {
    pub(crate) fn new(source: Arc<LazySource>, batch_size: usize) -> Arc<Self> {
        Arc::new(Self {
            source,
            batch_size,
            state: Mutex::default(),
            next_token: AtomicU64::new(1),
            starting: tokio::sync::Mutex::new(()),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, HubState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the shared subscription is running.
    pub(crate) fn is_running(&self) -> bool {
        self.state().seen.is_some()
    }

    /// The lock to hold while starting the shared subscription.
    pub(crate) fn starting(&self) -> &tokio::sync::Mutex<()> {
        &self.starting
    }

    /// Pending awaits, for the stats.
    pub(crate) fn pending(&self) -> usize {
        self.state().waiters.values().map(|w| if let Waiters::Many(all) = w { all.len() } else { 1 }).sum()
    }

    /// Registers an await of `id`'s completion; returns its receiver and where the
    /// subscription stood then.
    fn register(self: &Arc<Self>, id: ExecutionId) -> Result<(Registration, Frontier), Error> {
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let mut state = self.state();
        let Some(seen) = state.seen.clone() else {
            return Err(Error::unavailable("await completion", "the shared subscription is not running"));
        };
        let waiter = Waiter { token, tx };
        match state.waiters.get_mut(&id) {
            Some(waiters) => waiters.push(waiter),
            None => {
                state.waiters.insert(id, Waiters::One(waiter));
            }
        }
        Ok((Registration { hub: self.clone(), id, token, rx }, seen))
    }

    fn unregister(&self, id: ExecutionId, token: u64) {
        let mut state = self.state();
        if let Some(waiters) = state.waiters.get_mut(&id)
            && waiters.remove(token)
        {
            state.waiters.remove(&id);
        }
    }

    /// A watch of `id`: registered at the subscription's position, so it reads nothing back.
    pub(crate) fn watch(self: &Arc<Self>, id: ExecutionId) -> Result<CompletionWatch, Error> {
        let (registration, seen) = self.register(id)?;
        let cursor = Family::Completion.tag_cursor(self.source.cursor_of(&seen));
        Ok(CompletionWatch { registration, cursor })
    }

    /// Where the subscription stands, as a completion cursor.
    pub(crate) fn position(&self) -> Result<StreamCursor, Error> {
        let seen = self.state().seen.clone();
        let seen =
            seen.ok_or_else(|| Error::unavailable("completion position", "the shared subscription is not running"))?;
        Ok(Family::Completion.tag_cursor(self.source.cursor_of(&seen)))
    }

    /// `id`'s completion after `after` (a completion cursor; empty: after the subscription's
    /// position).
    pub(crate) async fn completion_after(
        self: &Arc<Self>,
        id: ExecutionId,
        after: &StreamCursor,
    ) -> Result<CompletionEvent, Error> {
        let after = Family::Completion.untag_cursor(after)?;
        let from = if after.is_empty() { None } else { Some(self.source.resolve_start(&after).await?) };
        let (mut registration, seen) = self.register(id)?;
        let Some(from) = from else { return registration.wait().await };
        if from.after.covers_all(&seen) {
            return registration.wait().await;
        }
        // Completions from `from` up to `seen` passed the hub before the await registered.
        let found = tokio::select! {
            biased;
            outcome = &mut registration.rx => return received(outcome),
            found = self.read_back(id, &from, &seen) => found?,
        };
        match found {
            Some(event) => Ok(event),
            None => registration.wait().await,
        }
    }

    /// Reads the backend from `from` up to `seen` for `id`'s completion.
    async fn read_back(
        &self,
        id: ExecutionId,
        from: &StartAt,
        seen: &Frontier,
    ) -> Result<Option<CompletionEvent>, Error> {
        let mut at = from.after.clone();
        // Resuming an `event_id`-only Postgres cursor: rows of its batch at or below the id
        // were seen.
        let floor = from.lo_floor.map(|lo| (at.single().major, lo));
        loop {
            let batch = self.source.read_after(&at, self.batch_size).await?;
            if let Some((_, reason)) = batch.lost {
                return Err(Error::CursorHistoryLost { reason, tail: None });
            }
            if batch.expired.as_ref().is_some_and(|b| !at.covers_all(b)) {
                let oldest =
                    batch.expired.map(|b| Family::Completion.tag_cursor(self.source.cursor_of(&at.joined(&b))));
                return Err(Error::CursorExpired { oldest });
            }
            for item in &batch.events {
                let below_floor = floor.is_some_and(|(major, lo)| item.pos.major == major && item.pos.lo <= lo);
                if let FamilyEvent::Completion(event) = &item.event
                    && event.execution_id == id
                    && !at.covers(item.pos)
                    && !below_floor
                {
                    let mut event = event.clone();
                    let mut stamped = at.clone();
                    stamped.advance(item.pos);
                    event.cursor = self.source.cursor_of(&stamped);
                    return Ok(Some(event));
                }
            }
            at.join(&batch.end);
            if at.covers_all(seen) || !batch.full {
                return Ok(None);
            }
        }
    }

    /// The shared subscription started at `at`.
    fn started(&self, at: &Frontier) {
        let mut state = self.state();
        if state.seen.is_none() {
            state.seen = Some(at.clone());
        }
    }

    /// The shared subscription ended with `err`: every pending await gets it, and the next
    /// await starts a new subscription.
    fn ended(&self, err: Error) {
        let waiters = {
            let mut state = self.state();
            state.seen = None;
            std::mem::take(&mut state.waiters)
        };
        let outcome = Err(err);
        for (_, w) in waiters {
            w.send(&outcome);
        }
    }

    /// The subscription offers `item`: a completion goes to its awaits.
    fn offer(&self, item: &Positioned, stamp: &dyn Fn(&mut StreamCursor)) -> Option<Sent> {
        let mut state = self.state();
        if let Some(seen) = state.seen.as_mut() {
            seen.advance(item.pos);
        }
        let FamilyEvent::Completion(event) = &item.event else { return None };
        let waiters = state.waiters.remove(&event.execution_id)?;
        drop(state);
        #[cfg(feature = "opentelemetry")]
        let _delivery = crate::trace_context::delivery_span(&item.event);
        let mut event = event.clone();
        stamp(&mut event.cursor);
        waiters.send(&Ok(event));
        Some(Sent::Done)
    }
}

/// The sink of a hub's shared subscription: never full, never closed.
pub(crate) struct AwaitSink(pub(crate) Arc<AwaitHub>);

impl Sink for AwaitSink {
    fn family(&self) -> Family {
        Family::Completion
    }

    fn offer(&self, item: &Positioned, stamp: &dyn Fn(&mut StreamCursor), delivered: &AtomicU64) -> Option<Sent> {
        let sent = self.0.offer(item, stamp);
        if sent.is_some() {
            delivered.fetch_add(1, Ordering::Relaxed);
        }
        sent
    }

    fn started(&self, at: &Frontier) {
        self.0.started(at);
    }

    fn send_error(&self, err: Error) {
        self.0.ended(err);
    }

    fn room(&self) -> Option<futures::future::BoxFuture<'static, bool>> {
        None
    }

    /// Awaits need no account of what was passed over.
    fn passed(&self, _through: &Frontier) {}
}

impl std::fmt::Debug for AwaitSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AwaitSink({} pending)", self.0.pending())
    }
}

/// A registered await; unregisters when dropped.
struct Registration {
    hub: Arc<AwaitHub>,
    id: ExecutionId,
    token: u64,
    rx: oneshot::Receiver<Outcome>,
}

impl Registration {
    async fn wait(&mut self) -> Outcome {
        received((&mut self.rx).await)
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.hub.unregister(self.id, self.token);
    }
}

fn received(outcome: Result<Outcome, oneshot::error::RecvError>) -> Outcome {
    outcome.unwrap_or_else(|_| Err(Error::Actor { detail: "the completion tree stopped".into() }))
}

/// The completion of one execution, awaited: created before the work is submitted (see
/// [`crate::CompletionSupervisorHandle::watch_completion`]), it resolves to the execution's
/// completion event, committed after the watch was created, however late it is awaited.
/// Dropping it gives the await up.
pub struct CompletionWatch {
    registration: Registration,
    cursor: StreamCursor,
}

impl CompletionWatch {
    /// The execution it awaits.
    pub fn execution_id(&self) -> ExecutionId {
        self.registration.id
    }

    /// The completion cursor it was created at: a process that awaits the same execution
    /// later (after a restart) passes it to
    /// [`crate::CompletionSupervisorHandle::await_completion`].
    pub fn cursor(&self) -> &StreamCursor {
        &self.cursor
    }
}

impl std::fmt::Debug for CompletionWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompletionWatch").field("execution_id", &self.registration.id).finish_non_exhaustive()
    }
}

impl Future for CompletionWatch {
    type Output = Result<CompletionEvent, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.registration.rx).poll(cx).map(received)
    }
}
