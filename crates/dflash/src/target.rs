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

/// A borrowed target is a target (a caller lends its sequence to a [`crate::CpuBackend`]).
impl<T: DraftTarget> DraftTarget for &mut T {
    fn embedding(&self) -> &Mat {
        (**self).embedding()
    }

    fn lm_head(&self) -> &Mat {
        (**self).lm_head()
    }
}
