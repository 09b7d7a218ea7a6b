//! Fuzz-style property tests: malformed safetensors headers and YAML
//! configurations never panic — they parse or return an error.

use std::sync::Arc;

use proptest::prelude::*;
use smelt_core::io::safetensors::read_header;
use smelt_core::io::{ByteSource, ModelTensors};

#[derive(Debug)]
struct Mem(Vec<u8>);

impl ByteSource for Mem {
    fn len(&self) -> u64 {
        self.0.len() as u64
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> smelt_core::Result<()> {
        let o = offset as usize;
        let end = o.checked_add(buf.len()).filter(|e| *e <= self.0.len());
        match end {
            Some(e) => {
                buf.copy_from_slice(&self.0[o..e]);
                Ok(())
            }
            None => Err(smelt_core::Error::msg("read past end")),
        }
    }
    fn name(&self) -> String {
        "mem".into()
    }
}

fn file_with_header(h: &str, data: usize) -> Vec<u8> {
    let mut v = (h.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(h.as_bytes());
    v.extend(std::iter::repeat_n(7u8, data));
    v
}

const DTYPES: &[&str] = &["F32", "BF16", "F16", "I64", "BOOL", "F8", "", "f32"];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = read_header(&Mem(bytes), 0);
    }

    #[test]
    fn random_header_fields_never_panic(
        dt in 0..DTYPES.len(),
        shape in proptest::collection::vec(0u64..1u64 << 40, 0..4),
        a in any::<u64>(), b in any::<u64>(),
        data in 0usize..64,
        extra in "[ -~]{0,12}",
    ) {
        let h = format!(
            r#"{{"__metadata__":{{"format":"pt"}},"t":{{"dtype":"{}","shape":{:?},"data_offsets":[{a},{b}]}}{extra}}}"#,
            DTYPES[dt], shape
        );
        let src = Mem(file_with_header(&h, data));
        if let Ok(tensors) = read_header(&src, 0) {
            // whatever parses must be readable without panicking
            let m = ModelTensors { label: "m".into(), shards: vec![Arc::new(src) as Arc<dyn ByteSource>], tensors, lora: None };
            for n in m.tensors.keys().cloned().collect::<Vec<_>>() {
                let _ = m.read(&n);
            }
        }
    }

    #[test]
    fn random_yaml_never_panics(text in "[ -~\n]{0,200}") {
        let _ = smelt_core::parse_config(&text, "fuzz.yml");
    }

    #[test]
    fn mutated_configs_never_panic(
        cut in 0usize..400,
        ins in "[ -~\n]{0,8}",
        method in prop::sample::select(vec!["linear", "ties", "slerp", "della", "nope", "passthrough"]),
    ) {
        let base = format!(
            "models:\n  - model: a\n    parameters:\n      weight: [0, 0.5, 1]\n      density: {{filter: mlp, value: 0.5}}\n  - model: b@rev+lora\n    parameters:\n      weight:\n        - filter: self_attn\n          value: 2\n        - value: 1\nmerge_method: {method}\nbase_model: a\ntokenizer:\n  source: union\n  tokens:\n    x: {{source: {{kind: model_token, model: a, token_id: 3}}}}\ndtype: bfloat16\n"
        );
        let cut = cut.min(base.len());
        let cut = (0..=cut).rev().find(|c| base.is_char_boundary(*c)).unwrap_or(0);
        let text = format!("{}{}{}", &base[..cut], ins, &base[cut..]);
        let _ = smelt_core::parse_config(&text, "fuzz.yml");
    }
}
