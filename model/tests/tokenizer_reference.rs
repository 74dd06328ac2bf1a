//! Our BPE reader against HF tokenizers itself: for both tokenizers in `../shared/data/tokenizers`
//! (GPT-2-style byte-level, Llama-2-style with byte fallback), the ids and decoded text HF gives for
//! 35 awkward texts (whitespace runs, unicode, emoji, control bytes, a special token) must be ours,
//! id for id.

mod reference_common;

use swarm_model::Tokenizer;
use swarm_model::tokenizer_bpe::BpeTokenizer;

#[test]
fn bpe_reader_agrees_with_hf_tokenizers_id_for_id() {
    let Some(refs) = reference_common::shared_data("tokenizers/reference_encodings.json") else {
        return;
    };
    let refs: serde_json::Value = serde_json::from_slice(&std::fs::read(refs).unwrap()).unwrap();
    let cases = refs["cases"].as_object().unwrap();
    assert_eq!(cases.len(), 2);
    let mut checked = 0;
    for (name, list) in cases {
        let path = reference_common::shared_data(&format!("tokenizers/{name}.json")).unwrap();
        let tok = BpeTokenizer::from_file(&path).unwrap();
        let mut failures = Vec::new();
        for case in list.as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            let want: Vec<u32> = case["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            let got = tok.encode(text);
            if got != want {
                failures.push(format!("{text:?}: ids {got:?}, HF {want:?}"));
            }
            let decoded = tok.decode(&want);
            if decoded != case["decoded"].as_str().unwrap() {
                failures.push(format!(
                    "{text:?}: decoded {decoded:?}, HF {:?}",
                    case["decoded"]
                ));
            }
            checked += 1;
        }
        assert!(failures.is_empty(), "{name}:\n{}", failures.join("\n"));
    }
    assert_eq!(checked, 70);
}
