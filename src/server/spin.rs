//! How a busy thread waits for its next input: it looks again for a short
//! while, yielding the CPU between looks, before it goes to sleep on the
//! queue. Waking a sleeping thread costs tens of microseconds on a virtual
//! machine, and a commit passes through the driver threads of two nodes
//! several times: with a 200 us spin (then on the store threads too), one
//! client's p50 went from 0.55 to 0.46 ms and 64 clients' throughput up 9%
//! (BENCHMARKS.md).
//! An idle node does not spin: only a thread whose last input came soon
//! after the one before looks again before sleeping, and only briefly
//! unless its inputs have been coming close enough together for the next
//! to be likely within the spin (one client's commit passes a follower's
//! driver about every 0.5 ms: a 200 us spin missed it every time).
//! Nor does a thread spin on when the CPU is wanted by others: a yield
//! that comes back late says so, and the thread sleeps instead.

use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::time::{Duration, Instant};

/// The default `--spin-us`: the longest a thread spins, when its inputs
/// have been coming at most half this far apart. Alternating against a
/// flat 200 us (BENCHMARKS.md): one client's p50 0.50-0.53 ms against
/// 0.58-0.60, 64 clients +1-4%, the machine's CPU time equal.
pub const DEFAULT_SPIN: Duration = Duration::from_micros(1000);

/// How long a busy thread spins when its inputs have been coming further
/// apart than half of `--spin-us`: spinning until the next one would burn
/// a core for each, so it looks again only briefly, as it always did.
const SHORT_SPIN: Duration = Duration::from_micros(200);

/// A yield that takes this long gave the CPU to other threads that wanted
/// it: the machine is busy, so the thread stops spinning and sleeps. An
/// idle core's yield returns in a microsecond or two. Alternating against
/// spinning on regardless (BENCHMARKS.md): 64 clients ahead in 12 of 14
/// pairs, median +7%, on two cores shared by three nodes and the clients;
/// one client's p50 unchanged.
const CONTENDED: Duration = Duration::from_micros(20);

/// Inputs closer together than this keep a thread spinning; heartbeats
/// alone (one per 40 ms by default) never do.
const BUSY: Duration = Duration::from_millis(2);

/// The waiting side of one thread's input queue.
#[derive(Debug)]
pub struct Spinner {
    spin: Duration,
    /// The last input came within `BUSY` of the wait for it starting.
    busy: bool,
    /// How long recent waits lasted until an input came (a moving
    /// average): how long the next one is likely to last.
    gap: Duration,
}

impl Spinner {
    /// Spins up to `spin` before sleeping; zero never spins.
    pub fn new(spin: Duration) -> Self {
        Spinner {
            spin,
            busy: false,
            gap: Duration::ZERO,
        }
    }

    /// The next item of `queue`, waiting up to `timeout` (`None`: for as
    /// long as it takes).
    pub fn recv<T>(
        &mut self,
        queue: &Receiver<T>,
        timeout: Option<Duration>,
    ) -> Result<T, RecvTimeoutError> {
        let started = Instant::now();
        let result = self.wait(queue, timeout, started);
        let waited = started.elapsed();
        self.busy = result.is_ok() && waited < BUSY;
        if result.is_ok() {
            self.gap = (self.gap * 3 + waited.min(BUSY)) / 4;
        }
        result
    }

    /// How long a busy thread spins: all of `spin` while inputs come at
    /// most half that far apart (the next is likely to come in time),
    /// `SHORT_SPIN` otherwise.
    fn budget(&self) -> Duration {
        if self.gap * 2 <= self.spin {
            self.spin
        } else {
            self.spin.min(SHORT_SPIN)
        }
    }

    fn wait<T>(
        &mut self,
        queue: &Receiver<T>,
        timeout: Option<Duration>,
        started: Instant,
    ) -> Result<T, RecvTimeoutError> {
        if self.busy && !self.spin.is_zero() {
            let spin = self.budget();
            let spin = timeout.map_or(spin, |timeout| timeout.min(spin));
            loop {
                match queue.try_recv() {
                    Ok(item) => return Ok(item),
                    Err(TryRecvError::Disconnected) => return Err(RecvTimeoutError::Disconnected),
                    Err(TryRecvError::Empty) if started.elapsed() >= spin => break,
                    Err(TryRecvError::Empty) => {
                        // A yield that took long ran other threads: the
                        // CPU is wanted, and spinning on would only take
                        // turns from them.
                        let before = Instant::now();
                        std::thread::yield_now();
                        if before.elapsed() >= CONTENDED {
                            break;
                        }
                    }
                }
            }
        }
        match timeout {
            Some(timeout) => queue.recv_timeout(timeout.saturating_sub(started.elapsed())),
            None => queue.recv().map_err(|_| RecvTimeoutError::Disconnected),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spins_only_while_inputs_come_close_together_and_loses_nothing() {
        let (send, queue) = std::sync::mpsc::channel();
        let mut spinner = Spinner::new(Duration::from_secs(2));
        // Idle: nothing queued, the wait times out and it is not busy.
        assert_eq!(
            spinner.recv(&queue, Some(Duration::from_millis(10))),
            Err::<u32, _>(RecvTimeoutError::Timeout)
        );
        assert!(!spinner.busy);
        send.send(1).unwrap();
        assert_eq!(spinner.recv(&queue, None), Ok(1));
        assert!(spinner.busy, "an input at once makes it busy");
        // Busy: an input sent during the spin is taken by it.
        let sender = send.clone();
        let late = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(5));
            sender.send(2).unwrap();
        });
        assert_eq!(spinner.recv(&queue, Some(Duration::from_secs(5))), Ok(2));
        late.join().unwrap();
        // A timeout shorter than the spin bounds it.
        let started = Instant::now();
        assert_eq!(
            spinner.recv(&queue, Some(Duration::from_millis(5))),
            Err(RecvTimeoutError::Timeout)
        );
        assert!(started.elapsed() < Duration::from_secs(1));
        assert!(!spinner.busy);
        drop(send);
        assert_eq!(
            spinner.recv(&queue, None),
            Err(RecvTimeoutError::Disconnected)
        );
    }

    #[test]
    fn spins_long_only_while_inputs_come_close_together() {
        let (send, queue) = std::sync::mpsc::channel();
        let mut spinner = Spinner::new(Duration::from_millis(1));
        for i in 0..8 {
            send.send(i).unwrap();
            spinner.recv(&queue, None).unwrap();
        }
        assert_eq!(spinner.budget(), Duration::from_millis(1));
        // Inputs 1.5 ms apart: the next would not come within the spin.
        for i in 0..8 {
            let sender = send.clone();
            let late = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_micros(1500));
                sender.send(i).unwrap();
            });
            spinner.recv(&queue, None).unwrap();
            late.join().unwrap();
        }
        assert_eq!(spinner.budget(), SHORT_SPIN);
        // A spin shorter than SHORT_SPIN is never lengthened.
        assert_eq!(
            Spinner::new(Duration::from_micros(50)).budget(),
            Duration::from_micros(50)
        );
    }
}
