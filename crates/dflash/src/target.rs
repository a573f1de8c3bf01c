//! What the speculative loop's host backend ([`crate::CpuBackend`]) runs against: a
//! [`model::Executor`] — one sequence of the target model, whose `forward` returns the logits
//! and the outputs of the drafter's target layers — that also lends the drafter the target's
//! token embedding and LM head ([`DraftTarget`]). Implemented for the CPU executor's
//! [`Session`].

use model::cpu::Session;
use model::weights::Mat;

/// The executor contract and its constants, re-exported where the loop's users look for them.
pub use model::executor::{hidden_index, Executor, FORWARD_CHUNK};

/// A target sequence the CPU [`crate::Drafter`] can draft for: an [`Executor`] that also lends
/// the host tables the drafter shares with its target.
///
/// The tables are asked of the sequence, not passed beside it, because the sequence is what is
/// known to run that model: a proxy for a sequence owned by another thread (the server's
/// scheduler) or an analytic test target has them without a `CpuModel`, and a caller cannot pair
/// a sequence with another model's tables by mistake. A GPU drafter reads the device copies of
/// these tables from the device model instead and does not use this trait.
pub trait DraftTarget: Executor {
    /// Token embedding table `[V, H]` (the drafter embeds its block with it).
    fn embedding(&self) -> &Mat;
    /// Output head `[V, H]` (the drafter's logits).
    fn lm_head(&self) -> &Mat;
}

impl DraftTarget for Session {
    fn embedding(&self) -> &Mat {
        &self.model().weights().embed
    }

    fn lm_head(&self) -> &Mat {
        &self.model().weights().lm_head
    }
}

/// Any executor's sequence lent to the CPU drafter with the host copies of its model's embedding
/// and LM head: a target whose tables live elsewhere (a tensor-parallel GPU sequence, whose
/// device copies the host drafter cannot read) drafts against the checkpoint's tables. The
/// caller vouches that `embed` and `lm_head` are the target model's.
pub struct WithTables<'a, E: ?Sized> {
    target: &'a mut E,
    embed: &'a Mat,
    lm_head: &'a Mat,
}

impl<'a, E: Executor + ?Sized> WithTables<'a, E> {
    pub fn new(target: &'a mut E, embed: &'a Mat, lm_head: &'a Mat) -> Self {
        WithTables {
            target,
            embed,
            lm_head,
        }
    }

    /// The sequence.
    pub fn target(&mut self) -> &mut E {
        self.target
    }
}

impl<E: Executor + ?Sized> Executor for WithTables<'_, E> {
    type Error = E::Error;

    fn config(&self) -> &model::config::ModelConfig {
        self.target.config()
    }

    fn len(&self) -> usize {
        self.target.len()
    }

    fn max_rollback(&self) -> usize {
        self.target.max_rollback()
    }

    fn prefill(&mut self, tokens: &[u32]) -> Result<std::borrow::Cow<'_, [f32]>, Self::Error> {
        self.target.prefill(tokens)
    }

    fn decode(&mut self, token: u32) -> Result<std::borrow::Cow<'_, [f32]>, Self::Error> {
        self.target.decode(token)
    }

    fn prefill_greedy(&mut self, tokens: &[u32]) -> Result<u32, Self::Error> {
        self.target.prefill_greedy(tokens)
    }

    fn decode_greedy(&mut self, token: u32) -> Result<u32, Self::Error> {
        self.target.decode_greedy(token)
    }

    fn verify(
        &mut self,
        tokens: &[u32],
        hidden: &[usize],
    ) -> Result<model::VerifyOutput, Self::Error> {
        self.target.verify(tokens, hidden)
    }

    fn forward(
        &mut self,
        tokens: &[u32],
        layers: &[usize],
    ) -> Result<model::VerifyOutput, Self::Error> {
        self.target.forward(tokens, layers)
    }

    fn truncate(&mut self, len: usize) -> Result<(), Self::Error> {
        self.target.truncate(len)
    }
}

impl<E: Executor + ?Sized> DraftTarget for WithTables<'_, E> {
    fn embedding(&self) -> &Mat {
        self.embed
    }

    fn lm_head(&self) -> &Mat {
        self.lm_head
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use model::cpu::toy::{self, ToyExperts};
    use model::cpu::CpuModel;

    use super::*;

    /// The adapter is the sequence: the same logits, lengths and truncation, and the tables given.
    #[test]
    fn with_tables_delegates_to_the_sequence() {
        let (c, w) = toy::gpt_oss(1, ToyExperts::Dense);
        let m = CpuModel::new(Arc::new(c), Arc::new(w)).unwrap();
        let mut plain = m.session();
        let want = plain.prefill(&[1, 2, 3]).unwrap().to_vec();
        let mut s = m.session();
        let (embed, head) = (&m.weights().embed, &m.weights().lm_head);
        let mut t = WithTables::new(&mut s, embed, head);
        assert_eq!(t.prefill(&[1, 2, 3]).unwrap().to_vec(), want);
        assert_eq!(Executor::len(&t), 3);
        t.truncate(1).unwrap();
        assert_eq!(t.target().len(), 1);
        assert!(std::ptr::eq(t.embedding(), embed) && std::ptr::eq(t.lm_head(), head));
    }
}
