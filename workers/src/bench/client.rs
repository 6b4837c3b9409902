//! The stamped-message WebSocket client behind `bench echo` and `bench broadcast`. It owns what
//! the two modes have in common: the state a run's connections share (clock, latency, live
//! counters, stop signals, the senders still sending), the steps their send and read loops are
//! made of, and the correctness checks (lost, corrupted, misrouted, duplicates, out of order)
//! as the report shows them. The modes keep what differs: who sends, at what pace, and whose
//! messages an arrival is checked against.

use std::ops::ControlFlow;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::SinkExt;
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

use super::payload::{self, PayloadError, PayloadWriter, Stamp};
use super::report::{Live, Progress, Report};
use super::stats::{
    Arrival, Clock, LatencyRecorder, LocalLatency, SeqTracker, due_by, micros_between, wake_for,
};
use super::{BenchError, net};

/// What every connection of one run shares.
#[derive(Debug)]
pub(super) struct Run {
    pub(super) clock: Clock,
    pub(super) latency: Arc<LatencyRecorder>,
    pub(super) live: Arc<Live>,
    /// Corrupted frames (valid first arrivals are `live.done`); together, every arrival once.
    pub(super) corrupted: AtomicU64,
    pub(super) stop_sending: CancellationToken,
    pub(super) stop_reading: CancellationToken,
    pub(super) writers_active: AtomicUsize,
    pub(super) writers_done: Notify,
    pub(super) size: usize,
    pub(super) binary: bool,
}

impl Run {
    /// A run whose clock starts now, with `writers` connections that will send.
    pub(super) fn new(writers: usize, size: usize, binary: bool) -> Self {
        Run {
            clock: Clock::start(),
            latency: Arc::new(LatencyRecorder::default()),
            live: Arc::new(Live::default()),
            corrupted: AtomicU64::new(0),
            stop_sending: CancellationToken::new(),
            stop_reading: CancellationToken::new(),
            writers_active: AtomicUsize::new(writers),
            writers_done: Notify::new(),
            size,
            binary,
        }
    }

    /// The progress line over this run's counters.
    pub(super) fn progress(
        &self,
        mode: &'static str,
        done_label: &'static str,
        quiet: bool,
    ) -> Progress {
        Progress::start(mode, done_label, &self.live, &self.latency, quiet)
    }

    /// Waits until every writer has sent its quota or `duration` after `start` has passed, stops
    /// the writers, and returns how long the load ran.
    pub(super) async fn end_load(&self, start: Instant, duration: Duration) -> Duration {
        super::end_load(
            &self.writers_active,
            &self.writers_done,
            &self.stop_sending,
            start,
            duration,
        )
        .await
    }

    /// Frames that arrived so far, valid or not (a duplicate is not counted).
    pub(super) fn arrived(&self) -> u64 {
        self.live.done.load(Ordering::Acquire) + self.corrupted.load(Ordering::Acquire)
    }

    /// Ends the run's reading once the drain is over: every connection stops and hands back
    /// what it saw (a connection whose task panicked, `failed(why)`), then the progress line
    /// stops, so that it cannot print into the report.
    pub(super) async fn stop_and_join<T>(
        &self,
        tasks: Vec<tokio::task::JoinHandle<T>>,
        progress: Progress,
        failed: impl Fn(String) -> T,
    ) -> Vec<T> {
        self.stop_reading.cancel();
        let outcomes =
            super::join_all(tasks, |e| failed(format!("connection task failed: {e}"))).await;
        progress.stop().await;
        outcomes
    }

    /// Called once by each writer when it stops, so that the load ends as soon as the last one
    /// has sent its quota.
    pub(super) fn writer_finished(&self) {
        if self.writers_active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.writers_done.notify_one();
        }
    }
}

/// A usage error unless `size` leaves room for the stamp every message starts with.
pub(super) fn check_size(size: usize) -> Result<(), BenchError> {
    if size < payload::HEADER_LEN {
        return Err(BenchError::Usage(format!(
            "--size must be at least {} bytes (the message header), got {size}",
            payload::HEADER_LEN
        )));
    }
    Ok(())
}

/// One send step (a feed or a flush) that gives way as soon as the run stops reading: a server
/// that stopped reading would otherwise keep the writer blocked past the end of the run.
/// `Break(None)`: the run stopped it; `Break(Some(why))`: the send failed.
async fn send_step<F>(
    step: impl Future<Output = Result<(), WsError>>,
    stop_reading: &mut F,
) -> ControlFlow<Option<String>>
where
    F: Future<Output = ()> + Unpin,
{
    let result = tokio::select! {
        biased;
        () = &mut *stop_reading => return ControlFlow::Break(None),
        r = step => r,
    };
    match result {
        Ok(()) => ControlFlow::Continue(()),
        Err(e) => ControlFlow::Break(Some(format!("send: {e}"))),
    }
}

/// One connection's sending side: its id, the sequence number of its next message, the buffer
/// its messages are written into, and the run's stop signals.
#[derive(Debug)]
pub(super) struct Sender<'a> {
    pub(super) id: u32,
    pub(super) seq: u64,
    writer: PayloadWriter,
    run: &'a Run,
    // Built once: a fresh cancellation future per message costs a registration each time.
    stop_sending: Pin<Box<WaitForCancellationFuture<'a>>>,
    stop_reading: Pin<Box<WaitForCancellationFuture<'a>>>,
}

impl<'a> Sender<'a> {
    pub(super) fn new(id: u32, run: &'a Run) -> Self {
        Sender {
            id,
            seq: 0,
            writer: PayloadWriter::new(run.size),
            run,
            stop_sending: Box::pin(run.stop_sending.cancelled()),
            stop_reading: Box::pin(run.stop_reading.cancelled()),
        }
    }

    /// Completes once the run stops sending.
    pub(super) fn stop_sending(&mut self) -> &mut Pin<Box<WaitForCancellationFuture<'a>>> {
        &mut self.stop_sending
    }

    /// Open loop: waits until message `seq` is due (`seq` intervals after `first_at`), then
    /// returns how many messages are due by now, from that one on (at most the rest of `quota`,
    /// and 1024 so that a late writer flushes at least every 1024 messages), with the first
    /// one's due time. `None` once the run stops sending.
    pub(super) async fn due_batch(
        &mut self,
        first_at: Instant,
        interval: Duration,
        quota: u64,
    ) -> Option<(u64, Instant)> {
        let due = first_at + interval.mul_f64(self.seq as f64);
        tokio::select! {
            biased;
            () = &mut self.stop_sending => return None,
            () = tokio::time::sleep_until(wake_for(due).into()) => {}
        }
        let batch = due_by(due, interval, Instant::now())
            .min(quota - self.seq)
            .min(1024);
        Some((batch, due))
    }

    /// Feeds `batch` messages and then flushes them, giving way as [`send_step`] does.
    /// `sent_ns(i)` stamps the batch's `i`-th message as it is built; `fed()` runs once for each
    /// message the sink took, and `seq` only counts those, so that the counts stay exact when a
    /// send fails midway.
    pub(super) async fn send_batch<S>(
        &mut self,
        sink: &mut S,
        batch: u64,
        mut sent_ns: impl FnMut(u64) -> u64,
        mut fed: impl FnMut(),
    ) -> ControlFlow<Option<String>>
    where
        S: futures_util::Sink<Message, Error = WsError> + Unpin,
    {
        for i in 0..batch {
            let stamp = Stamp {
                id: self.id,
                seq: self.seq,
                sent_ns: sent_ns(i),
            };
            let msg = net::ws_message(self.writer.write(stamp), self.run.binary);
            send_step(sink.feed(msg), &mut self.stop_reading).await?;
            self.seq += 1;
            fed();
        }
        send_step(sink.flush(), &mut self.stop_reading).await
    }
}

/// Reads data frames until the run stops reading or the connection ends, and hands each one's
/// stamp (or why it has none) with its arrival time to `on_frame`. Returns why the connection
/// ended, when it ended before the run did.
pub(super) async fn read_stamps<S>(
    stream: &mut S,
    run: &Run,
    mut on_frame: impl FnMut(Result<Stamp, PayloadError>, Instant),
) -> Option<String>
where
    S: futures_util::Stream<Item = Result<Message, WsError>> + Unpin,
{
    let stop_reading = run.stop_reading.cancelled();
    tokio::pin!(stop_reading);
    loop {
        let bytes = match net::next_data(stream, &mut stop_reading).await {
            Ok(Some(bytes)) => bytes,
            Ok(None) => return None,
            Err(why) => return Some(why),
        };
        let now = Instant::now();
        on_frame(payload::read(&bytes, run.size), now);
    }
}

/// What one connection's reader counts besides its sequence trackers.
#[derive(Debug, Default)]
pub(super) struct Tally {
    /// Batched so that a delivery does not take the shared recorder's lock.
    latency: LocalLatency,
    corrupted: u64,
}

impl Tally {
    /// A stamp meant for this connection: the first arrival of its sequence number counts as
    /// done and returns its latency in µs; a repeat counts as an error.
    pub(super) fn stamped(
        &mut self,
        run: &Run,
        tracker: &mut SeqTracker,
        stamp: &Stamp,
        now: Instant,
    ) -> Option<u64> {
        if tracker.record(stamp.seq) == Arrival::Duplicate {
            run.live.errors.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let us = micros_between(stamp.sent_ns, run.clock.ns_at(now));
        self.latency.record(&run.latency, us, now);
        run.live.done.fetch_add(1, Ordering::Release);
        Some(us)
    }

    /// A frame that is not a valid stamp for this connection.
    pub(super) fn corrupted(&mut self, run: &Run) {
        self.corrupted += 1;
        run.live.errors.fetch_add(1, Ordering::Relaxed);
        run.corrupted.fetch_add(1, Ordering::Release);
    }

    /// Hands the last latency samples to the run; returns the corrupted frames.
    pub(super) fn finish(mut self, run: &Run) -> u64 {
        self.latency.flush(&run.latency);
        self.corrupted
    }
}

/// A finished run's correctness counters; any of them above zero fails the run.
#[derive(Debug, Clone, Copy)]
pub(super) struct Checks {
    pub(super) lost: u64,
    pub(super) corrupted: u64,
    /// Broadcast only: deliveries from a sender of another room.
    pub(super) misrouted: Option<u64>,
    pub(super) duplicates: u64,
    pub(super) out_of_order: u64,
}

impl Checks {
    /// From what the trackers saw: `missing`, messages sent but never received, includes those
    /// that came back corrupted (a corrupted frame cannot be matched to its message), so they
    /// are not lost twice; `unexpected`, sequence numbers received that were never sent, can
    /// only be corruption.
    pub(super) fn new(
        missing: u64,
        corrupted: u64,
        unexpected: u64,
        duplicates: u64,
        out_of_order: u64,
    ) -> Self {
        Checks {
            lost: missing.saturating_sub(corrupted),
            corrupted: corrupted + unexpected,
            misrouted: None,
            duplicates,
            out_of_order,
        }
    }

    /// The report's checks line.
    pub(super) fn line(&self) -> String {
        let misrouted = self
            .misrouted
            .map(|m| format!("misrouted {m}, "))
            .unwrap_or_default();
        format!(
            "checks      lost {}, corrupted {}, {misrouted}duplicates {}, out of order {}",
            self.lost, self.corrupted, self.duplicates, self.out_of_order
        )
    }

    /// The counters' JSON fields, and the run's verdict on them.
    pub(super) fn report_to(&self, r: &mut Report) {
        let mut checks = vec![
            ("lost", "lost", self.lost),
            ("corrupted", "corrupted", self.corrupted),
        ];
        if let Some(m) = self.misrouted {
            checks.push(("misrouted", "misrouted", m));
        }
        checks.push(("duplicates", "duplicates", self.duplicates));
        checks.push(("out_of_order", "out of order", self.out_of_order));
        for (field, _, count) in &checks {
            r.field(field, *count);
        }
        for (_, what, count) in checks {
            r.must_be_zero(what, count);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corrupted_echoes_are_not_also_lost() {
        let c = Checks::new(5, 2, 1, 0, 0);
        assert_eq!((c.lost, c.corrupted), (3, 3));
        assert_eq!(
            c.line(),
            "checks      lost 3, corrupted 3, duplicates 0, out of order 0"
        );
        let c = Checks {
            misrouted: Some(4),
            ..c
        };
        assert_eq!(
            c.line(),
            "checks      lost 3, corrupted 3, misrouted 4, duplicates 0, out of order 0"
        );
        let mut r = Report::new("test");
        c.report_to(&mut r);
        assert_eq!(r.problems, ["3 lost", "3 corrupted", "4 misrouted"]);
        assert_eq!(r.json["misrouted"], 4);
    }
}
