//! Renders the real chat templates under tests/templates/ and compares with the outputs
//! Python jinja2 produced under transformers' conventions (tests/templates/cases.json,
//! written by tests/templates/gen_expected.py).

use caldera_tokenizer::{ChatTemplate, TemplateError};
use serde_json::Value;

fn templates_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/templates")
}

fn load_cases() -> Vec<Value> {
    let text = std::fs::read_to_string(templates_dir().join("cases.json")).expect("cases.json");
    let v: Value = serde_json::from_str(&text).expect("cases.json parses");
    v.as_array().expect("array").clone()
}

fn source_of(case: &Value) -> String {
    let name = case["template"].as_str().unwrap();
    if name == "inline" {
        case["source"].as_str().unwrap().to_owned()
    } else {
        std::fs::read_to_string(templates_dir().join(format!("{name}.jinja"))).unwrap()
    }
}

fn opt(v: &Value) -> Option<&Value> {
    if v.is_null() {
        None
    } else {
        Some(v)
    }
}

#[test]
fn real_templates_match_jinja2() {
    let cases = load_cases();
    assert!(cases.len() >= 15);
    let mut failures = Vec::new();
    for case in &cases {
        let label = format!(
            "{}/{}",
            case["template"].as_str().unwrap(),
            case["case"].as_str().unwrap()
        );
        let tmpl = ChatTemplate::new(
            &source_of(case),
            case["bos_token"].as_str().unwrap(),
            case["eos_token"].as_str().unwrap(),
        )
        .unwrap_or_else(|e| panic!("{label}: {e}"));
        let got = tmpl.render(
            &case["messages"],
            opt(&case["tools"]),
            case["add_generation_prompt"].as_bool().unwrap(),
            opt(&case["extra"]),
        );
        match (got, case.get("expected"), case.get("error")) {
            (Ok(out), Some(want), _) if out == want.as_str().unwrap() => {}
            (Err(TemplateError::Raised(msg)), None, Some(want))
                if msg == want.as_str().unwrap() => {}
            (got, want, err) => failures.push(format!(
                "--- {label}\n got: {got:?}\nwant: {:?}\n",
                want.or(err).unwrap()
            )),
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn qwen3_tools_with_string_arguments_match_object_arguments() {
    let cases = load_cases();
    let find = |name: &str| {
        cases
            .iter()
            .find(|c| c["template"] == "qwen3" && c["case"] == name)
            .unwrap()["expected"]
            .clone()
    };
    assert_eq!(find("tools"), find("tools_string_arguments"));
}

#[test]
fn llama3_strftime_now_fills_today() {
    let src = std::fs::read_to_string(templates_dir().join("llama3.jinja")).unwrap();
    let tmpl = ChatTemplate::new(&src, "<|begin_of_text|>", "<|eot_id|>").unwrap();
    let msgs = serde_json::json!([{"role": "user", "content": "hi"}]);
    let out = tmpl.render(&msgs, None, true, None).unwrap();
    let line = out.lines().find(|l| l.starts_with("Today Date: ")).unwrap();
    // "Today Date: DD Mon YYYY"
    let date = &line["Today Date: ".len()..];
    let parts: Vec<&str> = date.split(' ').collect();
    assert_eq!(parts.len(), 3, "{date}");
    assert_eq!(parts[0].len(), 2);
    assert_eq!(parts[1].len(), 3);
    assert!(parts[2].parse::<u32>().unwrap() >= 2024);
}
