//! Hostile and broken templates fail fast with typed errors.

use std::time::{Duration, Instant};

use caldera_tokenizer::template::TemplateLimits;
use caldera_tokenizer::{ChatTemplate, TemplateError};
use serde_json::json;

fn msgs() -> serde_json::Value {
    json!([{"role": "user", "content": "hi"}])
}

fn render(src: &str) -> Result<String, TemplateError> {
    ChatTemplate::new(src, "<s>", "</s>")?.render(&msgs(), None, true, None)
}

/// Renders `src` and demands a `Limit` error within one second.
fn assert_limited(src: &str) -> String {
    let start = Instant::now();
    let res = render(src);
    let took = start.elapsed();
    assert!(took < Duration::from_secs(1), "{src}: took {took:?}");
    match res {
        Err(TemplateError::Limit(msg)) => msg,
        other => panic!("{src}: expected a limit error, got {other:?}"),
    }
}

#[test]
fn huge_range_is_refused() {
    let msg = assert_limited("{% for i in range(10**9) %}x{% endfor %}");
    assert!(msg.contains("range") || msg.contains("fuel"), "{msg}");
}

#[test]
fn nested_loops_run_out_of_fuel() {
    let msg = assert_limited(
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    );
    assert!(msg.contains("fuel"), "{msg}");
}

#[test]
fn nested_loops_multiplying_output_hit_a_cap() {
    let limits = TemplateLimits {
        max_output_bytes: 1 << 20,
        ..TemplateLimits::default()
    };
    let t = ChatTemplate::new(
        "{% for i in range(100000) %}{% for j in range(100000) %}xxxxxxxxxxxxxxxx{% endfor %}{% endfor %}",
        "",
        "",
    )
    .unwrap()
    .with_limits(limits);
    let start = Instant::now();
    let res = t.render(&msgs(), None, false, None);
    assert!(start.elapsed() < Duration::from_secs(1));
    assert!(matches!(res, Err(TemplateError::Limit(_))), "{res:?}");
}

#[test]
fn output_cap_applies_to_plain_output() {
    let limits = TemplateLimits {
        max_output_bytes: 1000,
        ..TemplateLimits::default()
    };
    let t = ChatTemplate::new("{% for i in range(2000) %}x{% endfor %}", "", "")
        .unwrap()
        .with_limits(limits);
    match t.render(&msgs(), None, false, None) {
        Err(TemplateError::Limit(m)) => assert!(m.contains("1000 bytes"), "{m}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn string_repetition_blowups_are_refused() {
    let start = Instant::now();
    for src in [
        "{{ 'a' * 10**10 }}",
        "{{ 'abc' * 10**18 }}",
        "{% set x = 'a' * 50000000 %}{{ x ~ x }}",
        "{{ 'a' * 20000000 }}",
    ] {
        let res = render(src);
        assert!(
            matches!(res, Err(TemplateError::Limit(_) | TemplateError::Render(_))),
            "{src}: {res:?}"
        );
    }
    assert!(start.elapsed() < Duration::from_secs(1));
}

#[test]
fn filter_and_method_blowups_are_refused() {
    for src in [
        "{{ 'x\nx'|indent(10**10) }}",
        "{{ 'x'|indent(width=10**12) }}",
        "{{ ('a' * 1000)|replace('a', 'b' * 100000) }}",
        "{{ ('a' * 1000).replace('a', 'b' * 100000) }}",
        "{{ ('a' * 1000).replace('', 'b' * 100000) }}",
        "{{ range(100000)|join('x' * 1000000) }}",
        "{{ ('x' * 1000000).join(range(100000)) }}",
        "{{ '%999999999s'|format('x') }}",
        "{{ '{:>999999999}'.format('x') }}",
        "{{ '%*s'|format(999999999, 'x') }}",
        "{{ [1]|batch(10**9, 'x')|list }}",
        "{{ [1]|slice(10**9)|list }}",
        "{{ messages|tojson(indent=10**9) }}",
    ] {
        assert_limited(src);
    }
}

#[test]
fn macro_recursion_is_limited() {
    let msg = assert_limited("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}");
    assert!(msg.contains("recursion"), "{msg}");
    // Mutual recursion through a caller block.
    assert_limited(
        "{% macro a(n) %}{% call b(n) %}{% endcall %}{% endmacro %}\
         {% macro b(n) %}{{ a(n + 1) }}{{ caller() }}{% endmacro %}{{ a(0) }}",
    );
}

#[test]
fn deeply_nested_expressions_are_a_syntax_error() {
    let src = format!("{{{{ {}1{} }}}}", "(".repeat(5000), ")".repeat(5000));
    let start = Instant::now();
    let res = ChatTemplate::new(&src, "", "");
    assert!(start.elapsed() < Duration::from_secs(1));
    assert!(matches!(res, Err(TemplateError::Syntax(_))), "{res:?}");
}

#[test]
fn no_loader_no_include() {
    for src in [
        "{% include '/etc/passwd' %}",
        "{% import 'x.jinja' as x %}",
        "{% extends 'base' %}",
    ] {
        match render(src) {
            Err(TemplateError::Render(m)) => assert!(m.contains("include"), "{src}: {m}"),
            other => panic!("{src}: {other:?}"),
        }
    }
}

#[test]
fn no_python_internals() {
    for src in [
        "{{ messages.__class__ }}",
        "{{ ''.__class__.__mro__ }}",
        "{{ cycler.__init__.__globals__ }}",
    ] {
        // These render nothing useful (undefined) or fail; they must never expose anything.
        if let Ok(out) = render(src) {
            assert!(out.trim().is_empty(), "{src}: {out}");
        }
    }
}

#[test]
fn errors_carry_line_numbers() {
    match ChatTemplate::new("line one\n{% if x %}\nthree\n{% endfor %}", "", "") {
        Err(TemplateError::Syntax(m)) => assert!(m.contains("line 4"), "{m}"),
        other => panic!("{other:?}"),
    }
    match render("a\nb\n{{ messages[0].content.nope() }}") {
        Err(TemplateError::Render(m)) => assert!(m.contains("line 3"), "{m}"),
        other => panic!("{other:?}"),
    }
    match render(
        "\n\n\n{% for i in range(100000) %}{% for j in range(1000) %}{% endfor %}{% endfor %}",
    ) {
        Err(TemplateError::Limit(m)) => assert!(m.contains("line 4"), "{m}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn raise_exception_message_is_kept() {
    let res = render("{{ raise_exception('Only user and assistant roles are supported!') }}");
    assert_eq!(
        res,
        Err(TemplateError::Raised(
            "Only user and assistant roles are supported!".into()
        ))
    );
    let shown = res.unwrap_err().to_string();
    assert!(
        shown.contains("Only user and assistant roles are supported!"),
        "{shown}"
    );
}

#[test]
fn bad_inputs_are_typed_errors() {
    let t = ChatTemplate::new("{{ messages|length }}", "", "").unwrap();
    assert!(matches!(
        t.render(&json!({}), None, true, None),
        Err(TemplateError::InvalidInput(_))
    ));
    assert!(matches!(
        t.render(&json!([1]), None, true, None),
        Err(TemplateError::InvalidInput(_))
    ));
    assert!(matches!(
        t.render(&json!([{"content": "x"}]), None, true, None),
        Err(TemplateError::InvalidInput(_))
    ));
    assert!(matches!(
        t.render(&msgs(), Some(&json!("tools")), true, None),
        Err(TemplateError::InvalidInput(_))
    ));
    assert!(matches!(
        t.render(&msgs(), None, true, Some(&json!([1]))),
        Err(TemplateError::InvalidInput(_))
    ));
    assert!(matches!(
        t.render(&msgs(), None, true, Some(&json!({"messages": []}))),
        Err(TemplateError::InvalidInput(_))
    ));
    // Image parts cannot be flattened for a template that does not iterate content.
    let img =
        json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]);
    assert!(matches!(
        t.render(&img, None, true, None),
        Err(TemplateError::InvalidInput(_))
    ));
}

#[test]
fn template_is_send_sync_and_reusable_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<ChatTemplate>();
    let t = std::sync::Arc::new(
        ChatTemplate::new(
            "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}",
            "<s>",
            "</s>",
        )
        .unwrap(),
    );
    assert_eq!(
        t.source(),
        "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}"
    );
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let t = t.clone();
            std::thread::spawn(move || {
                let m = json!([{"role": "user", "content": format!("m{i}")}]);
                t.render(&m, None, false, None).unwrap()
            })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        assert_eq!(h.join().unwrap(), format!("<s>m{i}</s>"));
    }
}

#[test]
fn extra_may_override_special_tokens() {
    let t = ChatTemplate::new("{{ bos_token }}|{{ enable_thinking }}", "<s>", "</s>").unwrap();
    let out = t
        .render(
            &msgs(),
            None,
            false,
            Some(&json!({"bos_token": "<B>", "enable_thinking": 1})),
        )
        .unwrap();
    assert_eq!(out, "<B>|1");
}
