//! The sampling distribution as a dense probability vector: [`SamplingDist`], re-exported from
//! `model::sampling`, where it is the one definition of the sampling transform.
//!
//! [`model::sampling::Sampler`] draws a token; exact rejection sampling needs the distribution it
//! draws from, for the target rows (`p`) and the draft rows (`q`). [`SamplingDist::probs`] is
//! that distribution — the Sampler's own kept set and weights (penalties, temperature, top-k,
//! top-p, min-p), each divided by the kept mass — so the two agree exactly, support and
//! weights. Greedy parameters give the one-hot vector of the Sampler's argmax (lowest id among
//! ties).

pub use model::sampling::SamplingDist;
