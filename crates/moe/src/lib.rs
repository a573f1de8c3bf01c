//! Mixture-of-experts routing variants as pure functions shared by every executor (CPU, GPU
//! reference).
//!
//! Every executor — the CPU reference, the CUDA op-by-op executor, the persistent engine —
//! either calls these functions or is tested against them, so there is exactly one definition
//! of "which experts does this token go to, and with what weights".
//!
//! # Variants
//!
//! | [`RouterKind`] | models | selection | weights |
//! |---|---|---|---|
//! | [`RouterKind::GptOss`] | gpt-oss | top-k on the (biased) logits | softmax over the k selected logits |
//! | [`RouterKind::Qwen3Moe`] | Qwen3-MoE | softmax over all experts, top-k | the selected probabilities, optionally renormalized |
//! | [`RouterKind::Sigmoid`] | DeepSeek-V3, MiMo-V2-Flash | top-k of `sigmoid(z) + correction bias`, optionally group-limited | the unbiased sigmoid scores, optionally renormalized, × scaling factor |
//!
//! The single entry point is [`route`] (allocates its result) or [`route_into`] (writes into a
//! caller-owned [`Routing`] and [`RouterScratch`]; once their buffers have grown to size it
//! performs no allocation).
//!
//! # Numerics
//!
//! Inputs are `f32` router logits (`x · W_rᵀ`, computed with f32 accumulation by the caller) and
//! all routing math is done in `f32`, like the fp32 routers of the reference implementations.
//! Sums run sequentially in ascending expert order. Tests compare against an independent `f64`
//! reference; results agree to ~1e-6, and the selected experts agree except on near-ties (a gap
//! of a few f32 ulps between the k-th and (k+1)-th score), where no two implementations are
//! guaranteed to agree anyway.
//!
//! # Ordering and ties
//!
//! [`Routing::experts`] lists the selected experts in descending order of their *selection
//! score* (the biased logit for gpt-oss, the probability for Qwen3, the bias-corrected sigmoid
//! for the sigmoid router). Equal scores are ordered by lower expert id first, and when a tie
//! straddles the k-th place the lower id is selected. The same rule (lower group id first)
//! applies to group selection. `torch.topk` makes no such promise, so PyTorch references can
//! differ from this crate on exact ties only. [`Routing::weights`] is parallel to `experts`;
//! for the sigmoid router it is *not* necessarily descending (weights come from the unbiased
//! scores).
//!
//! # Dispatch
//!
//! [`Dispatch`] turns the routings of a batch of tokens into per-expert token lists (histogram,
//! prefix offsets, `(token, slot)` entries) and the list of distinct experts, which is what an
//! expert GEMV that reads each distinct expert once needs.

mod dispatch;
mod router;

pub use dispatch::{Dispatch, DispatchEntry};
pub use router::{route, route_into, RouterKind, RouterScratch, Routing, SigmoidRouter};

/// Errors of routing and dispatch bookkeeping. Routing never panics on bad input; it returns one
/// of these.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RoutingError {
    /// `k` was zero.
    #[error("top-k must be at least 1")]
    ZeroK,
    /// `k` exceeds the number of experts (the logits length).
    #[error("top-k = {k} exceeds the number of experts ({num_experts})")]
    KExceedsExperts { k: usize, num_experts: usize },
    /// A router bias (gpt-oss router bias or sigmoid correction bias) has the wrong length.
    #[error("router bias has {got} entries, expected one per expert ({expected})")]
    BiasLength { got: usize, expected: usize },
    /// A router logit is NaN or infinite.
    #[error("router logit {index} is not finite ({value})")]
    NonFiniteLogit { index: usize, value: f32 },
    /// A router bias entry is NaN or infinite.
    #[error("router bias {index} is not finite ({value})")]
    NonFiniteBias { index: usize, value: f32 },
    /// `n_group` is zero or does not divide the number of experts.
    #[error("n_group = {n_group} does not divide the number of experts ({num_experts})")]
    GroupsDoNotDivide { n_group: usize, num_experts: usize },
    /// `topk_group` is zero or exceeds `n_group`.
    #[error("topk_group = {topk_group} must be in 1..={n_group}")]
    TopkGroupOutOfRange { topk_group: usize, n_group: usize },
    /// The kept groups hold fewer experts than `k`.
    #[error("top-k = {k} exceeds the {kept} experts in the kept groups")]
    KExceedsKeptExperts { k: usize, kept: usize },
    /// The routed scaling factor is NaN or infinite.
    #[error("routed scaling factor is not finite ({0})")]
    NonFiniteScalingFactor(f32),
    /// Dispatch: a routing's `experts` and `weights` have different lengths.
    #[error("token {token}: {experts} experts but {weights} weights")]
    RoutingLengthMismatch {
        token: usize,
        experts: usize,
        weights: usize,
    },
    /// Dispatch: an expert id is not below the number of experts.
    #[error("token {token}: expert {expert} out of range (num_experts = {num_experts})")]
    ExpertOutOfRange {
        token: usize,
        expert: usize,
        num_experts: usize,
    },
    /// Dispatch: one token selects the same expert twice.
    #[error("token {token}: expert {expert} selected more than once")]
    DuplicateExpert { token: usize, expert: usize },
}
