//! How a busy thread waits for its next input: it looks again for a short
//! while, yielding the CPU between looks, before it goes to sleep on the
//! queue. Waking a sleeping thread costs tens of microseconds on a virtual
//! machine, and a commit passes through the driver threads of two nodes
//! several times: with a 200 us spin (then on the store threads too), one
//! client's p50 went from 0.55 to 0.46 ms and 64 clients' throughput up 9%
//! (BENCHMARKS.md).
//! An idle node does not spin: only a thread whose last input came soon
//! after the one before looks again before sleeping.

use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::time::{Duration, Instant};

/// The default `--spin-us`.
pub const DEFAULT_SPIN: Duration = Duration::from_micros(200);

/// Inputs closer together than this keep a thread spinning; heartbeats
/// alone (one per 40 ms by default) never do.
const BUSY: Duration = Duration::from_millis(2);

/// The waiting side of one thread's input queue.
#[derive(Debug)]
pub struct Spinner {
    spin: Duration,
    /// The last input came within `BUSY` of the wait for it starting.
    busy: bool,
}

impl Spinner {
    /// Spins up to `spin` before sleeping; zero never spins.
    pub fn new(spin: Duration) -> Self {
        Spinner { spin, busy: false }
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
        self.busy = result.is_ok() && started.elapsed() < BUSY;
        result
    }

    fn wait<T>(
        &mut self,
        queue: &Receiver<T>,
        timeout: Option<Duration>,
        started: Instant,
    ) -> Result<T, RecvTimeoutError> {
        if self.busy && !self.spin.is_zero() {
            let spin = timeout.map_or(self.spin, |timeout| timeout.min(self.spin));
            loop {
                match queue.try_recv() {
                    Ok(item) => return Ok(item),
                    Err(TryRecvError::Disconnected) => return Err(RecvTimeoutError::Disconnected),
                    Err(TryRecvError::Empty) if started.elapsed() >= spin => break,
                    Err(TryRecvError::Empty) => std::thread::yield_now(),
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
}
