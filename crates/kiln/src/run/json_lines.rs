//! A run folder's `model.json` read with the run-file parser: the JSON text is rewritten as TOML
//! (1.1, whose inline tables may span lines) value for value, keeping every value on the line it
//! had, so that errors name the line of the user's `model.json`.

use crate::error::{Error, Result};

/// The TOML text of the top-level members `keep` of a JSON object, each value on its JSON line.
pub(crate) fn json_to_toml(name: &str, text: &str, keep: &[&str]) -> Result<String> {
    // Check it is JSON first, so that the rewrite below may trust the syntax.
    serde_json::from_str::<serde_json::Value>(text)
        .map_err(|e| Error::Data(format!("{name} line {}: not JSON: {e}", e.line())))?;
    let mut w = Rewrite {
        name,
        text,
        pos: 0,
        out: String::with_capacity(text.len()),
        dropping: false,
    };
    w.space();
    w.expect('{')?;
    w.out.push(' ');
    loop {
        w.space();
        if w.peek() == Some('}') {
            w.pos += 1;
            break;
        }
        let key_start = w.out.len();
        let key = w.string_token()?;
        w.space();
        w.expect(':')?;
        w.out.push('=');
        w.space();
        w.dropping = !keep.contains(&key.as_str());
        w.value()?;
        if w.dropping {
            // Blank the member out, keeping its line breaks.
            let blank: String = w.out[key_start..]
                .chars()
                .map(|c| if c == '\n' { '\n' } else { ' ' })
                .collect();
            w.out.truncate(key_start);
            w.out.push_str(&blank);
        }
        w.space();
        match w.peek() {
            Some(',') => {
                w.pos += 1;
                // Top-level members end with a line break in TOML.
                let rest = &text[w.pos..];
                let next_on_new_line = rest
                    .find(|c: char| !c.is_whitespace())
                    .is_none_or(|i| rest[..i].contains('\n'));
                w.out.push(if next_on_new_line { ' ' } else { '\n' });
            }
            Some('}') => {
                w.pos += 1;
                break;
            }
            _ => return Err(w.error("expected `,` or `}`")),
        }
    }
    w.out.push(' ');
    w.space();
    Ok(w.out)
}

struct Rewrite<'a> {
    name: &'a str,
    text: &'a str,
    pos: usize,
    out: String,
    /// Inside a member that is left out (where a null is fine).
    dropping: bool,
}

impl Rewrite<'_> {
    fn peek(&self) -> Option<char> {
        self.text[self.pos..].chars().next()
    }

    fn line(&self) -> usize {
        self.text[..self.pos].matches('\n').count() + 1
    }

    fn error(&self, msg: &str) -> Error {
        Error::Data(format!("{} line {}: {msg}", self.name, self.line()))
    }

    /// Copies white space (line breaks included) as it is.
    fn space(&mut self) {
        while let Some(c) = self.peek().filter(|c| c.is_whitespace()) {
            self.out.push(c);
            self.pos += c.len_utf8();
        }
    }

    fn expect(&mut self, c: char) -> Result<()> {
        if self.peek() != Some(c) {
            return Err(self.error(&format!("expected `{c}`")));
        }
        self.pos += 1;
        Ok(())
    }

    /// A JSON string, written as a TOML basic string; returns its value.
    fn string_token(&mut self) -> Result<String> {
        if self.peek() != Some('"') {
            return Err(self.error("expected a string"));
        }
        let bytes = self.text.as_bytes();
        let mut end = self.pos + 1;
        while end < bytes.len() && bytes[end] != b'"' {
            end += if bytes[end] == b'\\' { 2 } else { 1 };
        }
        let token = &self.text[self.pos..=end.min(bytes.len() - 1)];
        let value: String =
            serde_json::from_str(token).map_err(|e| self.error(&format!("bad string: {e}")))?;
        push_basic_string(&mut self.out, &value);
        self.pos = end + 1;
        Ok(value)
    }

    fn value(&mut self) -> Result<()> {
        match self.peek() {
            Some('{') => {
                self.pos += 1;
                self.out.push('{');
                self.space();
                if self.peek() == Some('}') {
                    self.pos += 1;
                    self.out.push('}');
                    return Ok(());
                }
                loop {
                    self.space();
                    self.string_token()?;
                    self.space();
                    self.expect(':')?;
                    self.out.push('=');
                    self.space();
                    self.value()?;
                    self.space();
                    match self.peek() {
                        Some(',') => {
                            self.pos += 1;
                            self.out.push(',');
                        }
                        Some('}') => {
                            self.pos += 1;
                            self.out.push('}');
                            return Ok(());
                        }
                        _ => return Err(self.error("expected `,` or `}`")),
                    }
                }
            }
            Some('[') => {
                self.pos += 1;
                self.out.push('[');
                loop {
                    self.space();
                    if self.peek() == Some(']') {
                        self.pos += 1;
                        self.out.push(']');
                        return Ok(());
                    }
                    self.value()?;
                    self.space();
                    match self.peek() {
                        Some(',') => {
                            self.pos += 1;
                            self.out.push(',');
                        }
                        Some(']') => {
                            self.pos += 1;
                            self.out.push(']');
                            return Ok(());
                        }
                        _ => return Err(self.error("expected `,` or `]`")),
                    }
                }
            }
            Some('"') => self.string_token().map(|_| ()),
            Some(_) => {
                let rest = &self.text[self.pos..];
                let len = rest
                    .find(|c: char| c == ',' || c == '}' || c == ']' || c.is_whitespace())
                    .unwrap_or(rest.len());
                let token = &rest[..len];
                if token == "null" && !self.dropping {
                    return Err(self.error(
                        "null is not a value kiln can read here: remove the key or give a value",
                    ));
                }
                self.out.push_str(token);
                self.pos += len;
                Ok(())
            }
            None => Err(self.error("unexpected end of the file")),
        }
    }
}

/// Writes `value` as a one-line TOML basic string.
fn push_basic_string(out: &mut String, value: &str) {
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::json_to_toml;

    #[test]
    fn values_keep_their_lines_and_other_members_are_dropped() {
        let json = "{\n  \"format\": \"kiln-model\",\n  \"model\": {\n    \"layers\": [\n      {\"type\": \"dense\", \"units\": 8}\n    ]\n  },\n  \"data\": {\"a\": null},\n  \"seed\": 3\n}\n";
        let toml_text = json_to_toml("m.json", json, &["model", "seed"]).unwrap();
        assert_eq!(toml_text.lines().count(), json.lines().count());
        let parsed: toml::Table = toml::from_str(&toml_text).unwrap();
        assert_eq!(parsed["seed"].as_integer(), Some(3));
        assert!(parsed.get("data").is_none() && parsed.get("format").is_none());
        let units_line = toml_text.lines().position(|l| l.contains("units")).unwrap();
        assert_eq!(units_line, 4);
        // Compact JSON still parses (on one line).
        let compact = r#"{"model": {"layers": []}, "seed": 1}"#;
        let t: toml::Table =
            toml::from_str(&json_to_toml("c.json", compact, &["model", "seed"]).unwrap()).unwrap();
        assert_eq!(t["seed"].as_integer(), Some(1));
    }

    #[test]
    fn escapes_and_nulls() {
        let json = r#"{"model": {"name": "a\/b \u00e9 \"q\"\n\\ \u0001"}}"#;
        let t: toml::Table =
            toml::from_str(&json_to_toml("e.json", json, &["model"]).unwrap()).unwrap();
        assert_eq!(t["model"]["name"].as_str(), Some("a/b é \"q\"\n\\ \u{1}"));
        let err = json_to_toml("n.json", "{\n\"model\": {\"x\":\nnull}}", &["model"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("n.json line 3") && err.contains("null"),
            "{err}"
        );
        let err = json_to_toml("b.json", "{\n\"model\": [1,\n}", &["model"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("b.json line 3") && err.contains("not JSON"),
            "{err}"
        );
    }
}
