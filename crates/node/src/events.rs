//! The event stream (`blixard events`): the state changes this node applied, newest last,
//! in a bounded buffer that long-polling readers wait on.
//!
//! Every member applies every change, so every member's stream is the same, from when its
//! process started (the buffer is not kept across restarts). A reader asks for the events
//! after an index and, when there are none yet, waits for the next; one that fell further
//! behind than the buffer holds is told where its gap is, as etcd tells a watcher that its
//! revision was compacted.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use blixard_core::Topic;
use blixard_net::api::{Event, EventList};

/// Events kept per node.
pub const CAPACITY: usize = 4096;
/// The most a request without an index returns (the latest ones).
pub const RECENT: usize = 100;
/// The longest a request waits for a new event.
pub const MAX_WAIT: Duration = Duration::from_secs(25);

/// The buffer and a signal of its newest index.
pub struct Events {
    buffer: Mutex<VecDeque<Event>>,
    newest: tokio::sync::watch::Sender<u64>,
}

impl Default for Events {
    fn default() -> Self {
        Self {
            buffer: Mutex::new(VecDeque::new()),
            newest: tokio::sync::watch::channel(0).0,
        }
    }
}

impl Events {
    fn buffer(&self) -> std::sync::MutexGuard<'_, VecDeque<Event>> {
        match self.buffer.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Records an applied change (in apply order).
    pub fn push(&self, event: Event) {
        let index = event.index;
        {
            let mut b = self.buffer();
            if b.len() == CAPACITY {
                b.pop_front();
            }
            b.push_back(event);
        }
        self.newest.send_replace(index);
    }

    /// The events of `topics` (all when empty) after index `after`, or the latest
    /// [`RECENT`] without one; with the index to ask after next, and where a gap begins
    /// if events after `after` are no longer held.
    pub fn read(&self, after: Option<u64>, topics: &[Topic]) -> EventList {
        let b = self.buffer();
        let wanted = |e: &&Event| topics.is_empty() || topics.contains(&e.topic);
        let newest = b.back().map_or(after.unwrap_or(0), |e| e.index);
        let (events, gap) = match after {
            None => {
                let mut recent: Vec<Event> = b
                    .iter()
                    .rev()
                    .filter(wanted)
                    .take(RECENT)
                    .cloned()
                    .collect();
                recent.reverse();
                (recent, None)
            }
            Some(after) => {
                // The oldest held event is the first after a gap if anything between
                // `after` and it has been dropped.
                let gap = b
                    .front()
                    .filter(|first| b.len() == CAPACITY && first.index > after + 1)
                    .map(|first| first.index);
                let events = b
                    .iter()
                    .filter(|e| e.index > after)
                    .filter(wanted)
                    .cloned()
                    .collect();
                (events, gap)
            }
        };
        EventList {
            events,
            next: newest.max(after.unwrap_or(0)),
            gap,
        }
    }

    /// [`Self::read`], waiting up to `wait` (at most [`MAX_WAIT`]) for a matching event
    /// when there is none yet after `after`.
    pub async fn wait(&self, after: Option<u64>, topics: &[Topic], wait: Duration) -> EventList {
        let deadline = tokio::time::Instant::now() + wait.min(MAX_WAIT);
        let mut newest = self.newest.subscribe();
        loop {
            // The newest index is taken before the read: an event pushed after the read
            // is then newer than `seen` and wakes the wait, where taking it after the read
            // would count it as seen and sleep past it until the deadline.
            let seen = *newest.borrow_and_update();
            let list = self.read(after, topics);
            if after.is_none() || !list.events.is_empty() || list.gap.is_some() {
                return list;
            }
            let more = newest.wait_for(|n| *n > seen);
            if tokio::time::timeout_at(deadline, more).await.is_err() {
                return self.read(after, topics);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(index: u64, topic: Topic) -> Event {
        Event {
            index,
            at_ms: 0,
            kind: "k".into(),
            topic,
            name: format!("e{index}"),
            what: "w".into(),
        }
    }

    #[test]
    fn readers_get_what_follows_their_index_and_hear_of_gaps() {
        let e = Events::default();
        for i in 1..=5 {
            e.push(event(i, if i % 2 == 0 { Topic::Vm } else { Topic::Member }));
        }
        let all = e.read(Some(2), &[]);
        assert_eq!(
            all.events.iter().map(|e| e.index).collect::<Vec<_>>(),
            [3, 4, 5]
        );
        assert_eq!((all.next, all.gap), (5, None));
        let vms = e.read(Some(0), &[Topic::Vm]);
        assert_eq!(
            vms.events.iter().map(|e| e.index).collect::<Vec<_>>(),
            [2, 4]
        );
        assert_eq!(
            vms.next, 5,
            "the next read starts after what was skipped too"
        );
        assert_eq!(e.read(None, &[Topic::Member]).events.len(), 3);
        // Past the buffer's size, the oldest go, and a reader behind them is told.
        for i in 6..=(CAPACITY as u64 + 10) {
            e.push(event(i, Topic::Vm));
        }
        let behind = e.read(Some(3), &[]);
        assert_eq!(behind.gap, Some(11));
        assert_eq!(behind.events.len(), CAPACITY);
        assert_eq!(e.read(Some(11), &[]).gap, None);
        assert_eq!(e.read(None, &[]).events.len(), RECENT);
    }

    #[tokio::test]
    async fn a_reader_waits_for_the_next_event_or_its_time() {
        let e = std::sync::Arc::new(Events::default());
        e.push(event(1, Topic::Vm));
        let started = tokio::time::Instant::now();
        let none = e.wait(Some(1), &[], Duration::from_millis(100)).await;
        assert!(none.events.is_empty());
        assert!(started.elapsed() >= Duration::from_millis(100));
        let pusher = e.clone();
        let push = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            pusher.push(event(2, Topic::Member));
            tokio::time::sleep(Duration::from_millis(50)).await;
            pusher.push(event(3, Topic::Vm));
        });
        let vm = e.wait(Some(1), &[Topic::Vm], Duration::from_secs(5)).await;
        assert_eq!(vm.events.iter().map(|e| e.index).collect::<Vec<_>>(), [3]);
        push.await.unwrap();
    }
}
