//! What a handler sees and answers with: the request, the reply it fills,
//! and the deferred reply it can finish later from any thread.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::error::Status;
use crate::transport::{Lent, Outcome, Payload, ReplySink};

use super::service::{CancelView, Cancellation};
use super::stats::{Ended, FunctionStats, Stats};

/// One incoming call, as a handler sees it. Valid during the handler call.
#[derive(Clone, Copy)]
pub struct Request<'a> {
    /// The rank that made the call.
    pub src_rank: usize,
    /// The function that was called.
    pub function: &'a str,
    /// The call's arguments.
    pub args: &'a [u8],
    pub(crate) cancel: CancelView<'a>,
}

impl Request<'_> {
    /// True once the caller cancelled the call, or its deadline passed
    /// here: a handler that loops polls it and stops early (its answer is
    /// dropped).
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }
}

impl std::fmt::Debug for Request<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("src_rank", &self.src_rank)
            .field("function", &self.function)
            .field("args", &self.args.len())
            .finish()
    }
}

/// How a handler is run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HandlerOptions {
    /// Run on the I/O thread that read the request instead of the worker
    /// pool: no hand-off, but the handler must be tiny and never block. A
    /// rank's call to its own inline function runs it on the calling thread
    /// as a nested call (do not hold a lock it takes), or on a worker from
    /// inside an inline handler or a completion callback.
    pub inline: bool,
}

/// The type of a full handler: it fills `reply` (or defers it) and returns
/// `Err(message)` to fail the call.
pub type HandlerFn = dyn Fn(&Request<'_>, &mut Reply) -> Result<(), String> + Send + Sync;

/// A handler that takes ownership of the arguments buffer: it may transform
/// it in place and return it as the reply, with no copy (an echo, an
/// in-place update of a parameter shard).
pub type OwnedHandlerFn = dyn Fn(usize, Vec<u8>) -> Result<Vec<u8>, String> + Send + Sync;

pub(crate) enum Body {
    Borrowed(Box<HandlerFn>),
    Owned(Box<OwnedHandlerFn>),
}

pub(crate) struct Handler {
    pub options: HandlerOptions,
    pub body: Body,
}

/// Where and how one response goes back; used exactly once.
pub(crate) struct ReplyRoute {
    /// The answering function's counters (none for the agent's own
    /// functions and for names not found).
    pub function: Option<Arc<FunctionStats>>,
    pub sink: Arc<dyn ReplySink>,
    pub id: u64,
    pub max_message_bytes: u64,
    pub stats: Option<Arc<Stats>>,
    /// Whether the caller gave up; a cancelled call's answer is not sent.
    pub cancel: Cancellation,
}

impl ReplyRoute {
    /// Whether the caller cancelled the call (also where it marked it
    /// ahead of the frame), or its deadline passed here.
    pub(crate) fn is_cancelled(&self) -> bool {
        self.cancel.view(Some(&*self.sink)).is_cancelled()
    }

    /// Sends the response; a reply above the maximum becomes a TOO_LARGE
    /// error for the caller.
    pub(crate) fn send(self, outcome: Outcome) {
        self.send_then(outcome, false);
    }

    /// Like [`ReplyRoute::send`]; `more_follow`: this thread answers more
    /// requests right away (see [`ReplySink::send_reply`]).
    pub(crate) fn send_then(mut self, outcome: Outcome, more_follow: bool) {
        if self.cancel.finish() {
            if let Some(f) = &self.function {
                f.ended(Ended::Cancelled);
            }
            return;
        }
        let outcome = match outcome {
            Ok(data) if data.bytes().len() as u64 > self.max_message_bytes => Err((
                Status::TooLarge,
                format!(
                    "the reply of {} bytes exceeds the maximum message size of {} bytes",
                    data.bytes().len(),
                    self.max_message_bytes
                ),
            )),
            other => other,
        };
        if let Some(f) = &self.function {
            f.ended(match &outcome {
                Ok(data) => Ended::Served(data.bytes().len()),
                Err(_) => Ended::Failed,
            });
        }
        if let Some(stats) = &self.stats {
            stats.serving.requests_served.fetch_add(1, Ordering::Relaxed);
            if let Ok(data) = &outcome {
                stats
                    .serving
                    .bytes_sent
                    .fetch_add(data.bytes().len() as u64, Ordering::Relaxed);
            }
        }
        self.sink.send_reply(self.id, outcome, more_follow);
    }
}

/// The reply a handler fills. What it holds when the handler returns `Ok` is
/// sent, unless the handler deferred it.
pub struct Reply {
    route: Option<ReplyRoute>,
    data: Vec<u8>,
    /// Bytes lent by the application instead of `data` (given back when
    /// sent, replaced, or dropped).
    lent: Option<Box<dyn Lent>>,
    error: Option<String>,
    /// A reply buffer above the maximum was asked for: the caller is told
    /// the reply is too large, whatever the handler returns.
    too_large: Option<String>,
}

impl Reply {
    pub(crate) fn new(route: ReplyRoute) -> Reply {
        Reply {
            route: Some(route),
            data: Vec::new(),
            lent: None,
            error: None,
            too_large: None,
        }
    }

    /// Sets the reply bytes (taking ownership: no copy).
    pub fn set(&mut self, data: Vec<u8>) {
        self.data = data;
        self.lent = None;
    }

    /// Sets the reply to bytes the application lends (sent from where
    /// they are; dropping `lent` gives them back).
    pub(crate) fn set_lent(&mut self, lent: Box<dyn Lent>) {
        self.data = Vec::new();
        self.lent = Some(lent);
    }

    /// A zeroed reply buffer of `len` bytes for the handler to fill in place
    /// (a large one is a reused buffer, cleared: no page faults).
    pub fn alloc(&mut self, len: usize) -> &mut [u8] {
        self.lent = None;
        self.data = crate::net::buffers::take_zeroed(len);
        &mut self.data
    }

    /// Like [`Reply::alloc`], but a length above the maximum message size,
    /// or memory that cannot be had, is an error instead of an abort.
    pub fn try_alloc(&mut self, len: usize) -> crate::Result<&mut [u8]> {
        let max = self.route.as_ref().map_or(u64::MAX, |r| r.max_message_bytes);
        if len as u64 > max {
            let why = format!("the reply of {len} bytes exceeds the maximum message size of {max} bytes");
            self.too_large = Some(why.clone());
            return Err(crate::RpcError::TooLarge(why));
        }
        self.lent = None;
        self.data = if let Some(spare) = crate::net::buffers::take_spare_zeroed(len) {
            spare
        } else {
            let mut data = Vec::new();
            data.try_reserve_exact(len)
                .map_err(|_| crate::RpcError::Io(format!("cannot allocate a reply of {len} bytes")))?;
            data.resize(len, 0);
            data
        };
        Ok(&mut self.data)
    }

    /// Fails the call with `message` (the caller gets a handler error).
    pub fn error(&mut self, message: impl Into<String>) {
        self.error = Some(message.into());
    }

    /// True once the caller cancelled the call, or its deadline passed
    /// here (see [`Request::is_cancelled`]); false once deferred (ask the
    /// [`Deferred`]).
    pub fn is_cancelled(&self) -> bool {
        self.route.as_ref().is_some_and(ReplyRoute::is_cancelled)
    }

    /// True once the reply was deferred (it can no longer be set here).
    pub fn is_deferred(&self) -> bool {
        self.route.is_none()
    }

    /// Takes back the message given to [`Reply::error`], if any.
    pub fn take_error(&mut self) -> Option<String> {
        self.error.take()
    }

    /// Takes the reply out of the handler: the handler returns at once and
    /// the returned handle answers later, from any thread, exactly once.
    /// `None` if it was deferred already.
    pub fn defer(&mut self) -> Option<Deferred> {
        self.route.take().map(|mut route| {
            // Listed from now on if it was not (an inline handler's): the
            // cancel may now come while the answer waits.
            route.cancel.list();
            Deferred { route: Some(route) }
        })
    }

    /// Sends what the handler produced (nothing if it deferred);
    /// `more_follow` as in [`ReplyRoute::send_then`].
    pub(crate) fn finish(mut self, result: Result<(), String>, more_follow: bool) {
        let Some(route) = self.route.take() else {
            return;
        };
        let outcome = match (result, self.error.take(), self.too_large.take()) {
            (_, _, Some(why)) => Err((Status::TooLarge, why)),
            (Err(message), _, None) | (Ok(()), Some(message), None) => Err((Status::Handler, message)),
            (Ok(()), None, None) => Ok(match self.lent.take() {
                Some(lent) => Payload::Lent(lent),
                None => Payload::Owned(std::mem::take(&mut self.data)),
            }),
        };
        route.send_then(outcome, more_follow);
    }
}

/// A reply that the handler deferred. Finish it with [`Deferred::complete`]
/// or [`Deferred::fail`]; dropping it unfinished fails the call, so no caller
/// waits for an answer that will never come.
pub struct Deferred {
    route: Option<ReplyRoute>,
}

impl Deferred {
    /// True once the caller cancelled the call, or its deadline passed
    /// here: completing it is still allowed (the answer is dropped).
    pub fn is_cancelled(&self) -> bool {
        self.route.as_ref().is_some_and(ReplyRoute::is_cancelled)
    }

    /// Answers the call with `data`.
    pub fn complete(mut self, data: Vec<u8>) {
        if let Some(route) = self.route.take() {
            route.send(Ok(Payload::Owned(data)));
        }
    }

    /// Answers the call with bytes the application lends (given back once
    /// sent, or dropped).
    pub(crate) fn complete_lent(mut self, lent: Box<dyn Lent>) {
        if let Some(route) = self.route.take() {
            route.send(Ok(Payload::Lent(lent)));
        }
    }

    /// Fails the call; the caller gets a handler error with `message`.
    pub fn fail(mut self, message: impl Into<String>) {
        if let Some(route) = self.route.take() {
            route.send(Err((Status::Handler, message.into())));
        }
    }
}

impl Drop for Deferred {
    fn drop(&mut self) {
        if let Some(route) = self.route.take() {
            route.send(Err((
                Status::Handler,
                "the deferred reply was dropped without an answer".into(),
            )));
        }
    }
}

impl std::fmt::Debug for Deferred {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deferred").finish_non_exhaustive()
    }
}
