//! safetensors layer: single file, sharded index, decoders, and every kind of broken file →
//! an error naming the file and tensor (never a panic).

mod load_common;

use load_common::*;
use model::checkpoint::{f8_e4m3_to_f32, Checkpoint, CheckpointError, Dtype};

fn two_tensors() -> Tensors {
    let mut m = Tensors::new();
    m.insert(
        "a".into(),
        bf16(&[2, 3], &[1.0, -2.0, 0.5, 3.0, -0.25, 8.0]),
    );
    m.insert("b".into(), f32t(&[4], &[1.5, 2.5, -3.5, 1e-3]));
    m
}

fn open_bytes(bytes: &[u8]) -> Result<Checkpoint, CheckpointError> {
    let d = TempDir::new("ck");
    d.write("model.safetensors", bytes);
    let r = Checkpoint::open(d.path());
    drop(d);
    r
}

fn file_msg(e: &CheckpointError) -> String {
    let s = e.to_string();
    assert!(
        s.contains("model.safetensors"),
        "error should name the file: {s}"
    );
    s
}

#[test]
fn single_file_and_decoders() {
    let d = TempDir::new("single");
    let mut m = two_tensors();
    m.insert("h".into(), f16(&[3], &[0.5, -1.0, 65504.0]));
    m.insert("u".into(), u8t(&[2], vec![1, 2]));
    d.write("model.safetensors", serialize(&m));
    let ck = Checkpoint::open(d.path()).unwrap();
    assert_eq!(ck.len(), 4);
    assert_eq!(ck.names().collect::<Vec<_>>(), vec!["a", "b", "h", "u"]);
    let a = ck.tensor("a").unwrap();
    assert_eq!(a.dtype, Dtype::BF16);
    assert_eq!(a.shape, &[2, 3]);
    assert_eq!(a.data.len(), 12);
    assert!(a.file.ends_with("model.safetensors"));
    assert_eq!(
        ck.read_f32("a").unwrap(),
        vec![1.0, -2.0, 0.5, 3.0, -0.25, 8.0]
    );
    assert_eq!(ck.read_f32("b").unwrap(), vec![1.5, 2.5, -3.5, 1e-3]);
    assert_eq!(ck.read_f32("h").unwrap(), vec![0.5, -1.0, 65504.0]);
    let e = ck.read_f32("u").unwrap_err();
    assert!(
        matches!(e, CheckpointError::Tensor { ref tensor, .. } if tensor == "u"),
        "{e}"
    );
    let e = ck.tensor("zzz").unwrap_err();
    assert!(
        matches!(e, CheckpointError::NotFound { ref tensor, .. } if tensor == "zzz"),
        "{e}"
    );
    assert!(ck.get("zzz").is_none());
}

#[test]
fn large_tensor_parallel_decode() {
    let d = TempDir::new("large");
    let n = 300_001;
    let v: Vec<f32> = (0..n)
        .map(|i| bf16_round((i % 1000) as f32 * 0.01 - 5.0))
        .collect();
    let mut m = Tensors::new();
    m.insert("big".into(), bf16(&[n], &v));
    d.write("model.safetensors", serialize(&m));
    let ck = Checkpoint::open(d.path()).unwrap();
    assert_eq!(ck.read_f32("big").unwrap(), v);
}

#[test]
fn fp8_e4m3_decoding_and_block_scales() {
    // Table spot checks (torch.float8_e4m3fn).
    assert_eq!(f8_e4m3_to_f32(0x00), 0.0);
    assert_eq!(f8_e4m3_to_f32(0x38), 1.0);
    assert_eq!(f8_e4m3_to_f32(0xB8), -1.0);
    assert_eq!(f8_e4m3_to_f32(0x7E), 448.0);
    assert_eq!(f8_e4m3_to_f32(0x01), 2f32.powi(-9));
    assert_eq!(f8_e4m3_to_f32(0x08), 2f32.powi(-6));
    assert_eq!(f8_e4m3_to_f32(0x3C), 1.5);
    assert!(f8_e4m3_to_f32(0x7F).is_nan() && f8_e4m3_to_f32(0xFF).is_nan());
    // Every finite code round-trips through half's e4m3-free path: compare against a formula.
    for b in 0u8..=255 {
        let v = f8_e4m3_to_f32(b);
        if v.is_nan() {
            continue;
        }
        let s = if b & 0x80 != 0 { -1.0 } else { 1.0 };
        let e = ((b >> 3) & 15) as i32;
        let mm = (b & 7) as f32;
        let want = if e == 0 {
            s * mm / 8.0 * 2f32.powi(-6)
        } else {
            s * (1.0 + mm / 8.0) * 2f32.powi(e - 7)
        };
        assert_eq!(v, want, "code {b:#x}");
    }

    // A [3, 5] FP8 weight in 2×2 blocks → scales [2, 3].
    let codes: Vec<u8> = (0..15).map(|i| 0x30 + i as u8).collect();
    let scales: Vec<f32> = vec![1.0, 2.0, 4.0, 0.5, 0.25, 8.0];
    let mut m = Tensors::new();
    m.insert(
        "w.weight".into(),
        T {
            dtype: Dtype::F8_E4M3,
            shape: vec![3, 5],
            data: codes.clone(),
        },
    );
    m.insert("w.weight_scale_inv".into(), f32t(&[2, 3], &scales));
    m.insert(
        "plain".into(),
        T {
            dtype: Dtype::F8_E4M3,
            shape: vec![2],
            data: vec![0x38, 0xB8],
        },
    );
    let d = TempDir::new("fp8");
    d.write("model.safetensors", serialize(&m));
    let mut ck = Checkpoint::open(d.path()).unwrap();
    ck.set_fp8_block([2, 2]);
    let got = ck.read_f32("w.weight").unwrap();
    for r in 0..3 {
        for c in 0..5 {
            let want = f8_e4m3_to_f32(codes[r * 5 + c]) * scales[(r / 2) * 3 + c / 2];
            assert_eq!(got[r * 5 + c], want);
        }
    }
    assert_eq!(ck.read_f32("plain").unwrap(), vec![1.0, -1.0]);
    // Default 128×128 blocks → expected scales [1, 1]: the [2, 3] scales are rejected by name.
    ck.set_fp8_block([128, 128]);
    let e = ck.read_f32("w.weight").unwrap_err();
    assert!(
        matches!(e, CheckpointError::Tensor { ref tensor, ref message, .. }
            if tensor == "w.weight_scale_inv" && message.contains("[1, 1]")),
        "{e}"
    );
}

#[test]
fn mxfp4_pairs_and_nan_scale() {
    let (e, n, k) = (2usize, 3usize, 64usize);
    let w: Vec<f32> = (0..e * n * k)
        .map(|i| ((i % 13) as f32 - 6.0) * 0.25)
        .collect();
    let q = fp4::quantize_matrix(&w, e * n, k, fp4::ScaleRounding::Floor).unwrap();
    let mut m = Tensors::new();
    m.insert(
        "x_blocks".into(),
        u8t(&[e, n, k / 32, 16], q.blocks.clone()),
    );
    m.insert("x_scales".into(), u8t(&[e, n, k / 32], q.scales.clone()));
    m.insert(
        "y_blocks".into(),
        u8t(&[n, k / 32, 16], q.blocks[..n * k / 2].to_vec()),
    );
    m.insert(
        "y_scales".into(),
        u8t(&[n, k / 32], q.scales[..n * k / 32].to_vec()),
    );
    let mut bad = q.scales.clone();
    bad[n * (k / 32) + 3] = 0xFF; // expert 1, row 1, block 1
    m.insert(
        "z_blocks".into(),
        u8t(&[e, n, k / 32, 16], q.blocks.clone()),
    );
    m.insert("z_scales".into(), u8t(&[e, n, k / 32], bad));
    m.insert("f_blocks".into(), bf16(&[2], &[1.0, 2.0]));
    m.insert("f_scales".into(), u8t(&[2], vec![127, 127]));
    let d = TempDir::new("mx");
    d.write("model.safetensors", serialize(&m));
    let ck = Checkpoint::open(d.path()).unwrap();
    let x = ck.mxfp4_experts("x").unwrap();
    assert_eq!((x.experts(), x.rows(), x.k()), (e, n, k));
    let all = fp4::dequantize(q.view().unwrap());
    let e1 = fp4::dequantize(x.expert(1).unwrap());
    assert_eq!(e1, all[n * k..].to_vec());
    let y = ck.mxfp4_matrix("y").unwrap();
    assert_eq!((y.rows(), y.k()), (n, k));
    let err = ck.mxfp4_experts("z").unwrap_err();
    match &err {
        CheckpointError::Tensor {
            tensor, message, ..
        } => {
            assert_eq!(tensor, "z_scales");
            assert!(
                message.contains("NaN") && message.contains("expert 1, row 1, block 1"),
                "{err}"
            );
        }
        other => panic!("expected a tensor error, got {other}"),
    }
    let err = ck.mxfp4_experts("f").unwrap_err();
    assert!(
        matches!(err, CheckpointError::Tensor { ref tensor, .. } if tensor == "f_blocks"),
        "{err}"
    );
    let err = ck.mxfp4_experts("y").unwrap_err();
    assert!(
        matches!(err, CheckpointError::Tensor { ref tensor, .. } if tensor == "y_blocks"),
        "{err}"
    );
    let err = ck.mxfp4_experts("nope").unwrap_err();
    assert!(matches!(err, CheckpointError::NotFound { .. }), "{err}");
}

#[test]
fn sharded_index() {
    let d = TempDir::new("sharded");
    let mut s1 = Tensors::new();
    s1.insert("a".into(), bf16(&[2], &[1.0, 2.0]));
    let mut s2 = Tensors::new();
    s2.insert("b".into(), bf16(&[1], &[3.0]));
    s2.insert("c".into(), f32t(&[1], &[4.0]));
    d.write("model-00001-of-00002.safetensors", serialize(&s1));
    d.write("model-00002-of-00002.safetensors", serialize(&s2));
    let index = r#"{"metadata": {"total_size": 10}, "weight_map": {
        "a": "model-00001-of-00002.safetensors",
        "b": "model-00002-of-00002.safetensors",
        "c": "model-00002-of-00002.safetensors"}}"#;
    d.write("model.safetensors.index.json", index);
    let ck = Checkpoint::open(d.path()).unwrap();
    assert_eq!(ck.files().len(), 2);
    assert_eq!(ck.read_f32("a").unwrap(), vec![1.0, 2.0]);
    assert_eq!(ck.read_f32("c").unwrap(), vec![4.0]);
    assert!(ck
        .tensor("b")
        .unwrap()
        .file
        .ends_with("model-00002-of-00002.safetensors"));

    // Missing shard → names the shard and a tensor it should hold.
    let d2 = TempDir::new("sharded-missing");
    d2.write("model-00001-of-00002.safetensors", serialize(&s1));
    d2.write("model.safetensors.index.json", index);
    let e = Checkpoint::open(d2.path()).unwrap_err();
    assert!(
        matches!(e, CheckpointError::MissingShard { ref shard, ref tensor, .. }
            if shard == "model-00002-of-00002.safetensors" && tensor == "b"),
        "{e}"
    );
    assert!(e.to_string().contains("model-00002-of-00002.safetensors"));

    // Duplicate across shards.
    let d3 = TempDir::new("sharded-dup");
    let mut s2dup = s2.clone();
    s2dup.insert("a".into(), bf16(&[2], &[5.0, 6.0]));
    d3.write("model-00001-of-00002.safetensors", serialize(&s1));
    d3.write("model-00002-of-00002.safetensors", serialize(&s2dup));
    d3.write("model.safetensors.index.json", index);
    let e = Checkpoint::open(d3.path()).unwrap_err();
    assert!(
        matches!(e, CheckpointError::Duplicate { ref tensor, .. } if tensor == "a"),
        "{e}"
    );

    // Duplicate key inside the index.
    let d4 = TempDir::new("sharded-dupkey");
    d4.write("model-00001-of-00002.safetensors", serialize(&s1));
    d4.write("model-00002-of-00002.safetensors", serialize(&s2));
    d4.write(
        "model.safetensors.index.json",
        r#"{"weight_map": {"a": "model-00001-of-00002.safetensors", "a": "model-00002-of-00002.safetensors"}}"#,
    );
    let e = Checkpoint::open(d4.path()).unwrap_err();
    assert!(
        matches!(e, CheckpointError::Duplicate { ref tensor, .. } if tensor == "a"),
        "{e}"
    );

    // Index lists a tensor its shard lacks; index points outside the directory; bad index.
    let d5 = TempDir::new("sharded-lacks");
    d5.write("model-00001-of-00002.safetensors", serialize(&s1));
    d5.write(
        "model.safetensors.index.json",
        r#"{"weight_map": {"a": "model-00001-of-00002.safetensors", "q": "model-00001-of-00002.safetensors"}}"#,
    );
    let e = Checkpoint::open(d5.path()).unwrap_err();
    assert!(
        matches!(e, CheckpointError::Tensor { ref tensor, .. } if tensor == "q"),
        "{e}"
    );
    for bad in [
        r#"{"weight_map": {"a": "../model-00001-of-00002.safetensors"}}"#,
        r#"{"weight_map": {"a": "/etc/passwd"}}"#,
        r#"{"weight_map": {"a": 3}}"#,
        r#"{"weight_map": {}}"#,
        r#"{"weight_map": []}"#,
        r#"{"nothing": 1}"#,
        r#"{"#,
    ] {
        d5.write("model.safetensors.index.json", bad);
        let e = Checkpoint::open(d5.path()).unwrap_err();
        assert!(matches!(e, CheckpointError::Index { .. }), "{bad}: {e}");
        assert!(e.to_string().contains("model.safetensors.index.json"));
    }
}

#[test]
fn no_weights() {
    let d = TempDir::new("empty");
    let e = Checkpoint::open(d.path()).unwrap_err();
    assert!(matches!(e, CheckpointError::NoWeights { .. }), "{e}");
}

#[test]
fn broken_files() {
    let good = serialize(&two_tensors());
    let n = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&good[8..8 + n]).unwrap().to_string();
    let data = good[8 + n..].to_vec();
    let with_header = |h: &str| {
        let mut v = (h.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(h.as_bytes());
        v.extend_from_slice(&data);
        v
    };
    // Sanity: the rebuilt file opens.
    open_bytes(&with_header(&header)).unwrap();

    // Truncations: empty, < 8 bytes, header cut, data cut.
    for cut in [0, 5, 8, 8 + n / 2, good.len() - 1] {
        let e = open_bytes(&good[..cut]).unwrap_err();
        let s = file_msg(&e);
        assert!(
            s.contains("truncated") || s.contains("exceeds the file size") || s.contains("beyond"),
            "cut {cut}: {s}"
        );
    }
    // Header length larger than the file.
    let mut big = good.clone();
    big[..8].copy_from_slice(&(good.len() as u64 * 4).to_le_bytes());
    let s = file_msg(&open_bytes(&big).unwrap_err());
    assert!(s.contains("exceeds the file size"), "{s}");
    let mut huge = good.clone();
    huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    file_msg(&open_bytes(&huge).unwrap_err());
    // Corrupt header JSON / non-UTF-8 / not an object.
    let mut corrupt = good.clone();
    corrupt[8] = b'[';
    let s = file_msg(&open_bytes(&corrupt).unwrap_err());
    assert!(s.contains("corrupt header JSON"), "{s}");
    let mut bad_utf8 = good.clone();
    bad_utf8[9] = 0xFF;
    let s = file_msg(&open_bytes(&bad_utf8).unwrap_err());
    assert!(s.contains("UTF-8"), "{s}");
    // Offsets beyond the data section (names the tensor).
    let h = header.replace("[0,16]", "[0,1600]");
    assert_ne!(h, header, "header: {header}");
    let e = open_bytes(&with_header(&h)).unwrap_err();
    assert!(
        matches!(e, CheckpointError::Tensor { ref tensor, .. } if tensor == "b"),
        "{e}"
    );
    assert!(e.to_string().contains("beyond the data section"), "{e}");
    // Offsets disagreeing with dtype × shape.
    let h = header.replace("\"shape\":[4]", "\"shape\":[5]");
    assert_ne!(h, header);
    let e = open_bytes(&with_header(&h)).unwrap_err();
    assert!(
        matches!(e, CheckpointError::Tensor { ref tensor, .. } if tensor == "b"),
        "{e}"
    );
    // Unknown dtype.
    let h = header.replace("\"F32\"", "\"F33\"");
    let e = open_bytes(&with_header(&h)).unwrap_err();
    assert!(
        matches!(e, CheckpointError::Tensor { ref tensor, .. } if tensor == "b"),
        "{e}"
    );
    // Reversed offsets.
    let h = header.replace("[0,16]", "[16,0]");
    let e = open_bytes(&with_header(&h)).unwrap_err();
    assert!(
        matches!(e, CheckpointError::Tensor { ref tensor, .. } if tensor == "b"),
        "{e}"
    );
    // Overlapping tensors (b starts where a's data is): the crate's contiguity check.
    let h = header
        .replace("[16,28]", "[4,16]")
        .replace("[0,16]", "[16,32]");
    let e = open_bytes(&with_header(&h));
    assert!(e.is_err(), "overlap must be rejected: {h}");
    // Trailing garbage after the data section.
    let mut trailing = good.clone();
    trailing.extend_from_slice(&[0, 0, 0, 0]);
    let s = file_msg(&open_bytes(&trailing).unwrap_err());
    assert!(s.contains("trailing"), "{s}");
    // Duplicate tensor name inside one header.
    let dup = header.replacen("\"a\"", "\"b\"", 1);
    let e = open_bytes(&with_header(&dup)).unwrap_err();
    assert!(
        matches!(e, CheckpointError::Duplicate { ref tensor, .. } if tensor == "b"),
        "{e}"
    );
    // Bad __metadata__.
    let h = header.replacen('{', r#"{"__metadata__":{"x":1},"#, 1);
    let s = file_msg(&open_bytes(&with_header(&h)).unwrap_err());
    assert!(s.contains("__metadata__"), "{s}");
    // Good __metadata__ is accepted.
    let h = header.replacen('{', r#"{"__metadata__":{"format":"pt"},"#, 1);
    open_bytes(&with_header(&h)).unwrap();
}
