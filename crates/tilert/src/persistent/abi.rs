//! The persistent engine's ABI on the Rust side: the instruction record ([`PkInstr`]), the
//! per-phase argument block ([`PkOpArgs`]), the limits and the opcodes ([`Opcode`]). The one
//! definition of each is `kernels/common/persistent_abi.cuh` (embedded as
//! `ultra_kernels::PERSISTENT_ABI_HEADER`); the tests below check this mirror against it.

use cudarc::driver::DeviceRepr;

/// Most counters one instruction waits on.
pub const PK_MAX_WAITS: usize = 6;
/// Most counters one instruction signals.
pub const PK_MAX_SIGNALS: usize = 2;
/// Device-pointer slots of an argument block.
pub const PK_ARG_PTRS: usize = 12;
/// Integer slots of an argument block.
pub const PK_ARG_DIMS: usize = 16;
/// Float slots of an argument block.
pub const PK_ARG_FLOATS: usize = 4;
/// Threads of the resident kernel's block.
pub const PK_THREADS: u32 = 256;
/// `layer` of a model-level instruction.
pub const PK_NO_LAYER: u32 = u32::MAX;

/// What one instruction's tiles compute (`PK_OP_*` of the header; the tiling of each is
/// documented there and in `compile.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Opcode {
    Embed = 1,
    RmsNorm = 2,
    Qkv = 3,
    Attention = 4,
    AttnCombine = 5,
    LinearResidual = 6,
    RouterLogits = 7,
    RouterTopK = 8,
    ExpertGateUp = 9,
    ExpertDown = 10,
    CombineNorm = 11,
    MlpGateUp = 12,
    MlpDown = 13,
    LmHead = 14,
    Argmax = 15,
}

impl Opcode {
    /// Every opcode, in value order.
    pub const ALL: [Opcode; 15] = [
        Opcode::Embed,
        Opcode::RmsNorm,
        Opcode::Qkv,
        Opcode::Attention,
        Opcode::AttnCombine,
        Opcode::LinearResidual,
        Opcode::RouterLogits,
        Opcode::RouterTopK,
        Opcode::ExpertGateUp,
        Opcode::ExpertDown,
        Opcode::CombineNorm,
        Opcode::MlpGateUp,
        Opcode::MlpDown,
        Opcode::LmHead,
        Opcode::Argmax,
    ];

    /// The header's constant name (`PK_OP_…`) and the timeline's label.
    pub fn name(self) -> &'static str {
        match self {
            Opcode::Embed => "embed",
            Opcode::RmsNorm => "rms_norm",
            Opcode::Qkv => "qkv",
            Opcode::Attention => "attention",
            Opcode::AttnCombine => "attn_combine",
            Opcode::LinearResidual => "linear_residual",
            Opcode::RouterLogits => "router_logits",
            Opcode::RouterTopK => "router_topk",
            Opcode::ExpertGateUp => "expert_gate_up",
            Opcode::ExpertDown => "expert_down",
            Opcode::CombineNorm => "combine_norm",
            Opcode::MlpGateUp => "mlp_gate_up",
            Opcode::MlpDown => "mlp_down",
            Opcode::LmHead => "lm_head",
            Opcode::Argmax => "argmax",
        }
    }

    /// The opcode of value `v`.
    pub fn from_u32(v: u32) -> Option<Opcode> {
        Opcode::ALL.iter().copied().find(|o| *o as u32 == v)
    }
}

/// `struct PkInstr`: one instruction of an SM's stream (device memory, 128 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PkInstr {
    pub opcode: u32,
    pub arg: u32,
    pub tile_begin: u32,
    pub tile_end: u32,
    pub n_waits: u32,
    pub n_signals: u32,
    pub phase: u32,
    pub layer: u32,
    pub wait_counter: [u32; PK_MAX_WAITS],
    pub wait_target: [u32; PK_MAX_WAITS],
    pub signal_counter: [u32; PK_MAX_SIGNALS],
    pub signal_add: u32,
    pub bytes: u32,
    pub pad: [u32; 8],
}

impl PkInstr {
    /// The waits `(counter, per-step target)`.
    pub fn waits(&self) -> impl Iterator<Item = (u32, u32)> + '_ {
        let n = (self.n_waits as usize).min(PK_MAX_WAITS);
        (0..n).map(|i| (self.wait_counter[i], self.wait_target[i]))
    }
    /// The counters signalled (each by `signal_add`).
    pub fn signals(&self) -> &[u32] {
        &self.signal_counter[..(self.n_signals as usize).min(PK_MAX_SIGNALS)]
    }
}

/// `struct PkOpArgs`: one phase's argument block (device memory).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PkOpArgs {
    pub ptr: [u64; PK_ARG_PTRS],
    pub dim: [u32; PK_ARG_DIMS],
    pub f: [f32; PK_ARG_FLOATS],
    pub opcode: u32,
    pub tiles: u32,
}

/// `struct PkTrace`: the timeline record of one executed instruction (device memory).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PkTrace {
    /// `%globaltimer` (ns) at the start, when the waits were satisfied, at the end.
    pub t_start: u64,
    pub t_ready: u64,
    pub t_end: u64,
    /// `clock64` (SM cycles) at the same three points.
    pub c_start: u64,
    pub c_ready: u64,
    pub c_end: u64,
    /// `%smid` of the SM that ran it, and the block (stream) it belongs to.
    pub smid: u32,
    pub block: u32,
}

/// `struct PkState`: the step the next launch runs and the finished blocks of the running one.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PkState {
    pub step: u32,
    pub done: u32,
}

// SAFETY: plain old data laid out as the C structs the resident kernel reads from device memory.
unsafe impl DeviceRepr for PkInstr {}
unsafe impl DeviceRepr for PkOpArgs {}
unsafe impl DeviceRepr for PkTrace {}
unsafe impl DeviceRepr for PkState {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};
    use ultra_kernels::abi::{layouts_in, limits_in, StructLayout};
    use ultra_kernels::PERSISTENT_ABI_HEADER as H;

    #[test]
    fn structs_match_the_header() {
        let rust = [
            StructLayout {
                name: "PkInstr",
                size: size_of::<PkInstr>(),
                fields: vec![
                    ("opcode", offset_of!(PkInstr, opcode)),
                    ("arg", offset_of!(PkInstr, arg)),
                    ("tile_begin", offset_of!(PkInstr, tile_begin)),
                    ("tile_end", offset_of!(PkInstr, tile_end)),
                    ("n_waits", offset_of!(PkInstr, n_waits)),
                    ("n_signals", offset_of!(PkInstr, n_signals)),
                    ("phase", offset_of!(PkInstr, phase)),
                    ("layer", offset_of!(PkInstr, layer)),
                    ("wait_counter", offset_of!(PkInstr, wait_counter)),
                    ("wait_target", offset_of!(PkInstr, wait_target)),
                    ("signal_counter", offset_of!(PkInstr, signal_counter)),
                    ("signal_add", offset_of!(PkInstr, signal_add)),
                    ("bytes", offset_of!(PkInstr, bytes)),
                ],
            },
            StructLayout {
                name: "PkOpArgs",
                size: size_of::<PkOpArgs>(),
                fields: vec![
                    ("ptr", offset_of!(PkOpArgs, ptr)),
                    ("dim", offset_of!(PkOpArgs, dim)),
                    ("f", offset_of!(PkOpArgs, f)),
                    ("opcode", offset_of!(PkOpArgs, opcode)),
                    ("tiles", offset_of!(PkOpArgs, tiles)),
                ],
            },
            StructLayout {
                name: "PkTrace",
                size: size_of::<PkTrace>(),
                fields: vec![
                    ("t_start", offset_of!(PkTrace, t_start)),
                    ("t_ready", offset_of!(PkTrace, t_ready)),
                    ("t_end", offset_of!(PkTrace, t_end)),
                    ("c_start", offset_of!(PkTrace, c_start)),
                    ("c_ready", offset_of!(PkTrace, c_ready)),
                    ("c_end", offset_of!(PkTrace, c_end)),
                    ("smid", offset_of!(PkTrace, smid)),
                    ("block", offset_of!(PkTrace, block)),
                ],
            },
            StructLayout {
                name: "PkState",
                size: size_of::<PkState>(),
                fields: vec![
                    ("step", offset_of!(PkState, step)),
                    ("done", offset_of!(PkState, done)),
                ],
            },
        ];
        let header = layouts_in(H, "PK_ABI");
        assert_eq!(header.len(), rust.len(), "structs of persistent_abi.cuh");
        for r in &rust {
            let c = header
                .iter()
                .find(|c| c.name == r.name)
                .unwrap_or_else(|| panic!("persistent_abi.cuh declares no struct {}", r.name));
            assert_eq!(c, r, "layout of {} (left: header, right: Rust)", r.name);
        }
    }

    #[test]
    fn limits_and_opcodes_match_the_header() {
        let mut rust: Vec<(String, u64)> = vec![
            ("PK_MAX_WAITS".into(), PK_MAX_WAITS as u64),
            ("PK_MAX_SIGNALS".into(), PK_MAX_SIGNALS as u64),
            ("PK_ARG_PTRS".into(), PK_ARG_PTRS as u64),
            ("PK_ARG_DIMS".into(), PK_ARG_DIMS as u64),
            ("PK_ARG_FLOATS".into(), PK_ARG_FLOATS as u64),
            ("PK_THREADS".into(), PK_THREADS.into()),
            ("PK_NO_LAYER".into(), PK_NO_LAYER.into()),
        ];
        for op in Opcode::ALL {
            rust.push((format!("PK_OP_{}", op.name().to_uppercase()), op as u64));
            assert_eq!(Opcode::from_u32(op as u32), Some(op));
        }
        let header = limits_in(H);
        assert_eq!(header.len(), rust.len(), "constants of persistent_abi.cuh");
        for (name, value) in &rust {
            let c = header.iter().find(|(n, _)| n == name).map(|(_, v)| *v);
            assert_eq!(c, Some(*value), "{name} (header vs Rust)");
        }
        assert_eq!(Opcode::from_u32(0), None);
    }
}
