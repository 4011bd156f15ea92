//! What an officer sees: revealed values written so that they cannot act on the reader.
//!
//! - CSV: a cell that a spreadsheet would run as a formula (leading `=`, `+`, `-`, `@`, tab or
//!   carriage return) is prefixed with `'` and quoted, as OWASP recommends against CSV
//!   injection; cells are quoted per RFC 4180.
//! - Table: control, invisible and bidirectional characters (U+202E reverses what follows)
//!   are shown escaped as `\u{…}`, so what is printed is what is stored.
//! - JSON: serde_json escapes control characters; bidirectional ones are data there.
//!
//! Cells that hold revealed values live in zeroizing buffers until written.

use std::io::Write;

use zeroize::Zeroizing;

use pii_vault::unmask::Revealed;

const ERASED: &str = "(erased)";

pub const HEADERS: [&str; 8] = [
    "create_date",
    "user_id",
    "device_type",
    "ip",
    "device_id",
    "masked_ip",
    "masked_device_id",
    "message_id",
];

fn columns(r: &Revealed) -> [Zeroizing<String>; 8] {
    let value = |v: &Option<Zeroizing<String>>| {
        Zeroizing::new(v.as_deref().map_or(ERASED, String::as_str).to_owned())
    };
    let plain = |v: &str| Zeroizing::new(v.to_owned());
    [
        plain(&r.create_date.to_string()),
        plain(&r.user_id),
        plain(&r.device_type),
        value(&r.ip),
        value(&r.device_id),
        plain(r.masked_ip.as_deref().unwrap_or_default()),
        plain(r.masked_device_id.as_deref().unwrap_or_default()),
        plain(&r.message_id),
    ]
}

/// Characters that change how text around them is shown without being seen themselves.
fn acts_unseen(c: char) -> bool {
    c.is_control()
        || matches!(c,
            '\u{061C}' | '\u{200B}'..='\u{200F}' | '\u{2028}'..='\u{202E}'
            | '\u{2060}'..='\u{2064}' | '\u{2066}'..='\u{2069}' | '\u{FEFF}'
            | '\u{FFF9}'..='\u{FFFB}')
}

/// `text` with every character that acts unseen shown as an escape.
pub fn escape_for_terminal(text: &str) -> Zeroizing<String> {
    let mut shown = Zeroizing::new(String::with_capacity(text.len()));
    for c in text.chars() {
        if acts_unseen(c) || c == '\\' {
            shown.push_str(&c.escape_unicode().to_string());
        } else {
            shown.push(c);
        }
    }
    shown
}

/// One RFC 4180 cell that no spreadsheet will evaluate.
pub fn csv_cell(text: &str) -> Zeroizing<String> {
    let formula = text.starts_with(['=', '+', '-', '@', '\t', '\r']);
    let mut cell = Zeroizing::new(String::with_capacity(text.len() + 3));
    if formula || text.contains([',', '"', '\n', '\r']) {
        cell.push('"');
        if formula {
            cell.push('\'');
        }
        cell.push_str(&text.replace('"', "\"\""));
        cell.push('"');
    } else {
        cell.push_str(text);
    }
    cell
}

pub fn table(out: &mut impl Write, revealed: &[Revealed]) -> std::io::Result<()> {
    // Tokens are shortened on a terminal; json and csv carry them whole.
    let rows: Vec<[Zeroizing<String>; 8]> = revealed
        .iter()
        .map(|r| {
            let mut row = columns(r).map(|cell| escape_for_terminal(&cell));
            for token in &mut row[5..7] {
                if token.len() > 16 {
                    token.truncate(16);
                    token.push('…');
                }
            }
            row
        })
        .collect();
    let mut widths = HEADERS.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut line = |cells: [&str; 8]| -> std::io::Result<()> {
        let mut text = Zeroizing::new(String::new());
        for (i, (cell, width)) in cells.iter().zip(widths).enumerate() {
            if i > 0 {
                text.push_str("  ");
            }
            text.push_str(cell);
            if i < cells.len() - 1 {
                text.extend(std::iter::repeat_n(' ', width - cell.chars().count()));
            }
        }
        writeln!(out, "{}", text.trim_end())
    };
    line(HEADERS)?;
    for row in &rows {
        line(row.each_ref().map(|cell| cell.as_str()))?;
    }
    Ok(())
}

pub fn json(out: &mut impl Write, revealed: &[Revealed]) -> std::io::Result<()> {
    #[derive(serde::Serialize)]
    struct Line<'a> {
        login_id: i64,
        message_id: &'a str,
        user_id: &'a str,
        create_date: String,
        device_type: &'a str,
        ip: Option<&'a str>,
        device_id: Option<&'a str>,
        masked_ip: Option<&'a str>,
        masked_device_id: Option<&'a str>,
        key_committed: bool,
    }
    for r in revealed {
        let line = Line {
            login_id: r.login_id,
            message_id: &r.message_id,
            user_id: &r.user_id,
            create_date: r.create_date.to_string(),
            device_type: &r.device_type,
            ip: r.ip.as_deref().map(String::as_str),
            device_id: r.device_id.as_deref().map(String::as_str),
            masked_ip: r.masked_ip.as_deref(),
            masked_device_id: r.masked_device_id.as_deref(),
            key_committed: r.key_committed,
        };
        serde_json::to_writer(&mut *out, &line)?;
        writeln!(out)?;
    }
    Ok(())
}

pub fn csv(out: &mut impl Write, revealed: &[Revealed]) -> std::io::Result<()> {
    writeln!(out, "{}", HEADERS.join(","))?;
    for r in revealed {
        let mut line = Zeroizing::new(String::new());
        for (i, cell) in columns(r).iter().enumerate() {
            if i > 0 {
                line.push(',');
            }
            line.push_str(&csv_cell(cell));
        }
        writeln!(out, "{}", line.as_str())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formula_cells_are_neutralized_and_quoted() {
        assert_eq!(
            csv_cell("=cmd|' /C calc'!A0").as_str(),
            "\"'=cmd|' /C calc'!A0\""
        );
        for lead in ["+1", "-1", "@SUM(A1)", "\tx", "\rx"] {
            assert!(csv_cell(lead).starts_with("\"'"), "{lead:?}");
        }
        assert_eq!(csv_cell("a,\"b\"").as_str(), "\"a,\"\"b\"\"\"");
        assert_eq!(csv_cell("10.0.0.1").as_str(), "10.0.0.1");
        assert_eq!(csv_cell("a=b").as_str(), "a=b");
    }

    #[test]
    fn invisible_and_bidirectional_characters_are_shown_escaped() {
        assert_eq!(
            escape_for_terminal("abc\u{202E}fed").as_str(),
            "abc\\u{202e}fed"
        );
        assert_eq!(escape_for_terminal("a\u{1b}[2Jb").as_str(), "a\\u{1b}[2Jb");
        assert_eq!(
            escape_for_terminal("x\u{200B}\u{2067}y").as_str(),
            "x\\u{200b}\\u{2067}y"
        );
        // A backslash is escaped too, so an escape in the data cannot pass for ours.
        assert_eq!(
            escape_for_terminal("a\\u{202e}").as_str(),
            "a\\u{5c}u{202e}"
        );
        assert_eq!(escape_for_terminal("10.0.0.1 é").as_str(), "10.0.0.1 é");
    }
}
