//! The payload of a generator, timer or cron source: `{{seq}}` replaced by the item's number.

use bytes::Bytes;

/// A payload with `{{seq}}` placeholders, split once.
pub(super) struct Template {
    parts: Vec<String>,
}

impl Template {
    pub(super) fn new(text: &str) -> Template {
        Template {
            parts: text.split("{{seq}}").map(str::to_string).collect(),
        }
    }

    /// The payload `settings` give, or the default one.
    pub(super) fn or_default(payload: &Option<String>) -> Template {
        Template::new(
            payload
                .as_deref()
                .unwrap_or(switchyard_crds::DEFAULT_PAYLOAD),
        )
    }

    pub(super) fn render(&self, seq: u64) -> Bytes {
        let seq = seq.to_string();
        let mut out = Vec::with_capacity(self.parts.iter().map(String::len).sum::<usize>() + 8);
        for (i, part) in self.parts.iter().enumerate() {
            if i > 0 {
                out.extend_from_slice(seq.as_bytes());
            }
            out.extend_from_slice(part.as_bytes());
        }
        Bytes::from(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_number_every_message() {
        let t = Template::new(r#"{"item": {{seq}}, "again": "{{seq}}"}"#);
        assert_eq!(&t.render(17)[..], br#"{"item": 17, "again": "17"}"#);
        assert_eq!(&Template::new("{}").render(1)[..], b"{}");
    }
}
