//! Graceful shutdown in a world that may have lost ranks: the ranks meet at
//! a coordinator, the lowest rank each believes alive, which answers them
//! all once every rank has either arrived or is known lost. A rank whose
//! coordinator turns out dead moves to the next one and tells it who is
//! lost; the coordinator also learns of deaths from its own connections and
//! by probing ranks that keep it waiting. So the survivors wait for each
//! other (serving each other's calls meanwhile), and a dead rank, even the
//! coordinator, never cuts them short.
//!
//! This file is the coordinator's bookkeeping, without I/O: what arrives,
//! what is lost, who to answer and who to probe.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// A coordinator waiting this long with no new arrival probes the ranks it
/// still waits for (a dead one fails the probe with PEER_LOST).
pub(crate) const PROBE_AFTER: Duration = Duration::from_secs(1);

/// The coordinator's view of one shutdown; `R` is how an arrival is
/// answered (a reply route in the agent).
pub(crate) struct Gather<R> {
    world_size: usize,
    arrived: BTreeMap<usize, R>,
    lost: BTreeSet<usize>,
    last_arrival: Option<Instant>,
    /// The lost ranks, once every rank has arrived or is lost.
    done: Option<Vec<usize>>,
}

/// Arrivals to answer (by rank), with the ranks that were lost.
pub(crate) struct Release<R> {
    pub routes: Vec<(usize, R)>,
    pub lost: Vec<usize>,
}

impl<R> Gather<R> {
    pub(crate) fn new(world_size: usize) -> Gather<R> {
        Gather {
            world_size,
            arrived: BTreeMap::new(),
            lost: BTreeSet::new(),
            last_arrival: None,
            done: None,
        }
    }

    /// Rank `src` reached its shutdown, knowing `lost` to be dead. Once the
    /// gather is complete, a late arrival is answered at once.
    pub(crate) fn arrive(&mut self, src: usize, lost: &[usize], route: R, now: Instant) -> Option<Release<R>> {
        if let Some(done) = &self.done {
            return Some(Release {
                routes: vec![(src, route)],
                lost: done.clone(),
            });
        }
        self.lost.extend(lost.iter().copied().filter(|&r| r < self.world_size));
        // It is here: whatever was said of it, it is alive.
        self.lost.remove(&src);
        self.arrived.insert(src, route);
        self.last_arrival = Some(now);
        self.release()
    }

    /// Rank `rank` is dead (its connection failed, a probe found it gone).
    pub(crate) fn peer_lost(&mut self, rank: usize) -> Option<Release<R>> {
        if self.done.is_some() || rank >= self.world_size || self.arrived.contains_key(&rank) {
            return None;
        }
        self.lost.insert(rank);
        self.release()
    }

    /// The ranks to probe now: those not arrived and not known lost, once
    /// the gather has begun and waited [`PROBE_AFTER`] since the last
    /// arrival. Empty otherwise.
    pub(crate) fn to_probe(&self, me: usize, now: Instant) -> Vec<usize> {
        match self.last_arrival {
            Some(t) if self.done.is_none() && now.duration_since(t) >= PROBE_AFTER => (0..self.world_size)
                .filter(|r| *r != me && !self.arrived.contains_key(r) && !self.lost.contains(r))
                .collect(),
            _ => Vec::new(),
        }
    }

    fn release(&mut self) -> Option<Release<R>> {
        if self.arrived.len() + self.lost.len() < self.world_size {
            return None;
        }
        let lost: Vec<usize> = self.lost.iter().copied().collect();
        self.done = Some(lost.clone());
        Some(Release {
            routes: std::mem::take(&mut self.arrived).into_iter().collect(),
            lost,
        })
    }
}

/// Ranks as the wire carries them: little-endian u32s.
pub(crate) fn encode_ranks(ranks: &[usize]) -> Vec<u8> {
    ranks.iter().flat_map(|&r| (r as u32).to_le_bytes()).collect()
}

/// The ranks in `bytes`; `None` if it is not a whole number of them.
pub(crate) fn decode_ranks(bytes: &[u8]) -> Option<Vec<usize>> {
    if !bytes.len().is_multiple_of(4) {
        return None;
    }
    Some(
        bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")) as usize)
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_everyone_when_all_arrive() {
        let now = Instant::now();
        let mut g = Gather::new(3);
        assert!(g.arrive(0, &[], 'a', now).is_none());
        assert!(g.arrive(2, &[], 'c', now).is_none());
        let r = g.arrive(1, &[], 'b', now).unwrap();
        assert_eq!(r.routes.iter().map(|r| r.1).collect::<Vec<_>>(), vec!['a', 'b', 'c']);
        assert!(r.lost.is_empty());
        // Late: answered at once with the same outcome.
        let late = g.arrive(1, &[], 'x', now).unwrap();
        assert_eq!(late.routes.iter().map(|r| r.1).collect::<Vec<_>>(), vec!['x']);
    }

    #[test]
    fn lost_ranks_are_not_waited_for() {
        let now = Instant::now();
        let mut g = Gather::new(4);
        // Rank 2 found rank 0 (the first coordinator) dead.
        assert!(g.arrive(2, &[0], 'c', now).is_none());
        assert!(g.arrive(1, &[0], 'b', now).is_none());
        let r = g.peer_lost(3).unwrap();
        assert_eq!(r.routes.iter().map(|r| r.1).collect::<Vec<_>>(), vec!['b', 'c']);
        assert_eq!(r.lost, vec![0, 3]);
    }

    #[test]
    fn an_arrival_outweighs_a_rumour_of_death() {
        let now = Instant::now();
        let mut g = Gather::new(3);
        assert!(g.arrive(2, &[1], 'c', now).is_none());
        assert!(g.arrive(1, &[], 'b', now).is_none());
        let r = g.arrive(0, &[], 'a', now).unwrap();
        assert!(r.lost.is_empty());
        // A rank that arrived is not lost when its connection closes after.
        let mut g = Gather::new(3);
        assert!(g.arrive(1, &[], 'b', now).is_none());
        assert!(g.peer_lost(1).is_none());
        assert!(g.arrive(0, &[], 'a', now).is_none());
    }

    #[test]
    fn probes_only_a_stalled_gather() {
        let now = Instant::now();
        let mut g: Gather<char> = Gather::new(4);
        assert!(g.to_probe(0, now + PROBE_AFTER).is_empty());
        assert!(g.arrive(0, &[], 'a', now).is_none());
        assert!(g.peer_lost(3).is_none());
        assert!(g.to_probe(0, now).is_empty());
        assert_eq!(g.to_probe(0, now + PROBE_AFTER), vec![1, 2]);
    }

    #[test]
    fn ranks_round_trip_and_bad_lengths_are_refused() {
        assert_eq!(decode_ranks(&encode_ranks(&[0, 7, 65536])), Some(vec![0, 7, 65536]));
        assert_eq!(decode_ranks(&[1, 2, 3]), None);
        assert_eq!(decode_ranks(&[]), Some(vec![]));
    }
}
