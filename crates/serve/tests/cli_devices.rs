//! `ultra devices` runs on any machine: without a driver or GPU it says so (and still reports
//! NCCL); with GPUs it lists them and the peer matrix.

use std::process::Command;

#[test]
fn devices_runs_and_explains() {
    let out = Command::new(env!("CARGO_BIN_EXE_ultra"))
        .arg("devices")
        .env_remove("ULTRA_NCCL_LIB")
        .output()
        .expect("running ultra devices");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "ultra devices failed: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    if text.starts_with("no GPU: ") {
        // The CPU machines of CI: the sentence names the cause and that the CPU is used.
        assert!(text.contains("Ultra runs on the CPU"), "{text}");
    } else {
        assert!(text.contains(" GPU(s)\n  GPU 0: "), "{text}");
    }
    let nccl = text.lines().last().unwrap_or_default();
    assert!(
        nccl.starts_with("NCCL unavailable: libnccl.so not found") || nccl.starts_with("NCCL 2."),
        "{text}"
    );
}
