//! The order in which a stage visits its training data: a seeded shuffle per epoch, so that a
//! run resumed from `(epoch, cursor)` sees exactly the items the uninterrupted run would.

use crate::train::rng::{splitmix64, Rng};

/// Indices `0..n` (pretraining windows, examples, pairs, prompts) visited in a seeded random
/// order, reshuffled each epoch; `(epoch, cursor)` is the data position a checkpoint records.
#[derive(Clone)]
pub struct WindowSampler {
    n: usize,
    seed: u64,
    epoch: u64,
    cursor: usize,
    order: Vec<usize>,
}

impl WindowSampler {
    pub fn new(n: usize, seed: u64) -> Self {
        let mut s = Self {
            n,
            seed,
            epoch: 0,
            cursor: 0,
            order: vec![],
        };
        s.shuffle();
        s
    }

    fn shuffle(&mut self) {
        self.order = (0..self.n).collect();
        Rng::new(self.seed ^ splitmix64(self.epoch)).shuffle(&mut self.order);
    }

    /// The items of one epoch.
    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    pub fn position(&self) -> (u64, usize) {
        (self.epoch, self.cursor)
    }

    pub fn seek(&mut self, epoch: u64, cursor: usize) {
        self.epoch = epoch;
        self.shuffle();
        self.cursor = cursor.min(self.n);
    }

    /// The position as a checkpoint's task state records it: `{"epoch", "cursor", "items"}`
    /// (how many items the order is over); stages add their own fields to the object.
    pub fn state(&self) -> serde_json::Value {
        serde_json::json!({"epoch": self.epoch, "cursor": self.cursor, "items": self.n})
    }

    /// Seeks to the position [`state`](Self::state) recorded (missing fields count as 0).
    /// A position over another number of items (other data, or records cut or left out
    /// otherwise) would replay another order: refused.
    pub fn restore(&mut self, state: &serde_json::Value) -> anyhow::Result<()> {
        if let Some(n) = state.get("items").and_then(serde_json::Value::as_u64) {
            if n != self.n as u64 {
                anyhow::bail!(
                    "the checkpoint's data position is over {n} items, this run's data has {}: resume with the data (and [data] truncation) the run started with",
                    self.n
                );
            }
        }
        self.seek(
            state_u64(state, "epoch"),
            state_u64(state, "cursor") as usize,
        );
        Ok(())
    }

    /// This rank's `per_rank` indices of the next global batch: every rank draws all
    /// `per_rank * world` indices from the same seeded order and keeps its own slice, so the
    /// ranks together see what one process with the global batch would, and each rank's
    /// position stays the one a checkpoint records.
    pub fn next_slice(&mut self, per_rank: usize, rank: usize, world: usize) -> Vec<usize> {
        let global: Vec<usize> = (0..per_rank * world).map(|_| self.next_index()).collect();
        global[rank * per_rank..(rank + 1) * per_rank].to_vec()
    }

    pub fn next_index(&mut self) -> usize {
        if self.cursor == self.n {
            self.epoch += 1;
            self.cursor = 0;
            self.shuffle();
        }
        self.cursor += 1;
        self.order[self.cursor - 1]
    }
}

/// An integer field of a task state, 0 when absent (a state written before the field existed).
pub fn state_u64(state: &serde_json::Value, key: &str) -> u64 {
    state
        .get(key)
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_epoch_visits_each_index_once_and_seek_replays() {
        let mut s = WindowSampler::new(5, 7);
        let mut first: Vec<usize> = (0..5).map(|_| s.next_index()).collect();
        let second: Vec<usize> = (0..5).map(|_| s.next_index()).collect();
        let mut r = WindowSampler::new(5, 7);
        // A state written before `items` was recorded still restores.
        r.restore(&serde_json::json!({"epoch": 1, "cursor": 2}))
            .unwrap();
        assert_eq!(r.next_index(), second[2]);
        first.sort();
        assert_eq!(first, [0, 1, 2, 3, 4]);
    }

    #[test]
    fn a_position_over_other_data_is_refused() {
        let mut s = WindowSampler::new(5, 7);
        s.next_index();
        let state = s.state();
        assert!(WindowSampler::new(5, 7).restore(&state).is_ok());
        let e = WindowSampler::new(4, 7).restore(&state).unwrap_err();
        assert!(
            e.to_string()
                .contains("over 5 items, this run's data has 4"),
            "{e}"
        );
    }
}
