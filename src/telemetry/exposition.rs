//! Writing a metric family in the Prometheus text format (version 0.0.4), for the families
//! that are read at scrape time rather than recorded through the `metrics` facade.

use std::fmt::Write as _;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

/// One family: `# HELP`, `# TYPE`, then its samples, and a blank line.
#[derive(Debug)]
pub struct Family<'a> {
    name: &'a str,
    kind: Kind,
    help: &'a str,
    samples: Vec<(String, f64)>,
}

impl<'a> Family<'a> {
    pub fn new(name: &'a str, kind: Kind, help: &'a str) -> Self {
        Self {
            name,
            kind,
            help,
            samples: Vec::new(),
        }
    }

    /// Adds a sample with these labels (name, value).
    pub fn sample(mut self, labels: &[(&str, &str)], value: f64) -> Self {
        let mut series = String::new();
        if !labels.is_empty() {
            series.push('{');
            for (i, (name, value)) in labels.iter().enumerate() {
                if i > 0 {
                    series.push(',');
                }
                let _ = write!(series, "{name}=\"{}\"", escape(value));
            }
            series.push('}');
        }
        self.samples.push((series, value));
        self
    }

    /// Appends the family; one without samples is left out altogether.
    pub fn write(&self, out: &mut String) {
        if self.samples.is_empty() {
            return;
        }
        let kind = match self.kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        };
        let _ = writeln!(out, "# HELP {} {}", self.name, self.help);
        let _ = writeln!(out, "# TYPE {} {kind}", self.name);
        for (labels, value) in &self.samples {
            let _ = writeln!(out, "{}{labels} {}", self.name, number(*value));
        }
        out.push('\n');
    }
}

/// A label value as the text format quotes it.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Whole numbers without a fraction, as the `metrics` exporter prints them.
fn number(value: f64) -> String {
    if value.is_nan() {
        "NaN".into()
    } else if value.is_infinite() {
        if value > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        value.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_family_is_help_type_samples_and_a_blank_line() {
        let mut out = String::new();
        Family::new("x_info", Kind::Gauge, "What x is.")
            .sample(&[("version", "1.0"), ("odd", "a\"b\\c\nd")], 1.0)
            .sample(&[], 0.25)
            .write(&mut out);
        assert_eq!(
            out,
            "# HELP x_info What x is.\n# TYPE x_info gauge\n\
             x_info{version=\"1.0\",odd=\"a\\\"b\\\\c\\nd\"} 1\nx_info 0.25\n\n"
        );
        let mut empty = String::new();
        Family::new("y_total", Kind::Counter, "Nothing yet.").write(&mut empty);
        assert_eq!(empty, "");
    }
}
