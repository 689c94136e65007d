//! The ratio chart of every report (`vmm bench`'s shadow/ept chart and
//! `vmm compare`'s three-way chart): per group (workload), one bar per
//! series, on a log scale whose baseline 1 is drawn and labelled. Bars grow
//! from 1 — up when a column costs more than the baseline, down when it
//! costs less — so a ratio of 0.95 draws as a short bar, not a tall one.
//! Every bar carries its value; the host label sits under the title; the
//! legend has its own strip below the plot, so it covers nothing.

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// What to draw.
#[derive(Debug, Clone)]
pub struct RatioChart {
    /// The title.
    pub title: String,
    /// Lines under the title: the host(s) the figures come from.
    pub hosts: Vec<String>,
    /// What 1 means, e.g. "ept mode" (drawn as "1 = ept mode").
    pub baseline: String,
    /// The y axis' description.
    pub y_desc: String,
    /// Group names along the x axis (workloads).
    pub groups: Vec<String>,
    /// The bars.
    pub series: Vec<Series>,
}

/// One series of bars.
#[derive(Debug, Clone)]
pub struct Series {
    /// The legend's text.
    pub label: String,
    /// One value per group (`None`: not measured).
    pub values: Vec<Option<f64>>,
    /// How a value is written on its bar ([`format_ratio`] for ratios).
    pub text: fn(f64) -> String,
}

impl Series {
    /// A series of ratios, labelled `×N`.
    pub fn ratios(label: impl Into<String>, values: Vec<Option<f64>>) -> Series {
        Series { label: label.into(), values, text: format_ratio }
    }
}

/// Split a line into pieces of at most `max` characters at spaces.
fn wrap(line: &str, max: usize) -> Vec<String> {
    let mut out = vec![String::new()];
    for word in line.split(' ') {
        let cur = out.last_mut().expect("never empty");
        if !cur.is_empty() && cur.chars().count() + 1 + word.chars().count() > max {
            out.push(format!("    {word}"));
        } else {
            if !cur.is_empty() {
                cur.push(' ');
            }
            cur.push_str(word);
        }
    }
    out
}

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// A ratio as the chart and the tables print it: `×13`, `×2.9`, `×0.74`.
pub fn format_ratio(v: f64) -> String {
    if v >= 9.95 {
        format!("×{v:.0}")
    } else if v >= 0.995 {
        format!("×{v:.1}")
    } else {
        format!("×{v:.2}")
    }
}

fn axis_label(v: f64) -> String {
    if v >= 1.0 { format!("{v:.0}") } else { format!("{v:.2}").trim_end_matches('0').to_string() }
}

/// The y range: every value and the baseline inside, with room for labels.
pub fn y_range(values: impl IntoIterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .into_iter()
        .filter(|v| v.is_finite() && *v > 0.0)
        .fold((1.0f64, 1.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    ((lo / 2.0).max(1e-3), hi * 2.0)
}

impl RatioChart {
    /// Write the chart as SVG.
    pub fn write_svg(&self, path: &std::path::Path) -> Result<(), String> {
        let err = |e: &dyn std::fmt::Display| e.to_string();
        let width = 980u32;
        let hosts: Vec<String> = self.hosts.iter().flat_map(|h| wrap(h, 150)).collect();
        let header = 40 + 18 * hosts.len() as u32;
        // Legend items laid out left to right, wrapping; the baseline first.
        let baseline = format!("1 = {}", self.baseline);
        let labels: Vec<&str> =
            std::iter::once(baseline.as_str()).chain(self.series.iter().map(|s| s.label.as_str())).collect();
        let mut items = Vec::new();
        let (mut x, mut row) = (80i32, 0i32);
        for label in &labels {
            let w = 30 + 7 * label.chars().count() as i32;
            if x + w > width as i32 - 20 && x > 80 {
                x = 80;
                row += 1;
            }
            items.push((x, row));
            x += w + 24;
        }
        let legend_h = 16 + 22 * (row as u32 + 1);
        let plot_h = 440u32;
        let height = header + plot_h + legend_h;
        let root = SVGBackend::new(path, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        root.draw(&Text::new(self.title.clone(), (16, 10), ("sans-serif", 20).into_font())).map_err(|e| err(&e))?;
        let grey = RGBColor(70, 70, 70);
        for (i, h) in hosts.iter().enumerate() {
            let style = ("sans-serif", 13).into_font().color(&grey);
            root.draw(&Text::new(h.clone(), (16, 38 + 18 * i as i32), style)).map_err(|e| err(&e))?;
        }
        let (_, rest) = root.split_vertically(header);
        let (plot, _) = rest.split_vertically(plot_h);
        let (lo, hi) = y_range(self.series.iter().flat_map(|s| s.values.iter().flatten().copied()));
        let n = self.groups.len().max(1) as f64;
        let mut chart = ChartBuilder::on(&plot)
            .margin_left(12)
            .margin_right(16)
            .margin_top(8)
            .x_label_area_size(34)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..n, (lo..hi).log_scale())
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .y_desc(self.y_desc.clone())
            .y_label_formatter(&|v| axis_label(*v))
            .draw()
            .map_err(|e| err(&e))?;
        // Group names under the x axis, centred on their bars.
        for (i, g) in self.groups.iter().enumerate() {
            let (px, py) = chart.backend_coord(&(i as f64 + 0.5, lo));
            let style = TextStyle::from(("sans-serif", 15).into_font()).pos(Pos::new(HPos::Center, VPos::Top));
            root.draw(&Text::new(g.clone(), (px, py + 8), style)).map_err(|e| err(&e))?;
        }
        let m = self.series.len().max(1) as f64;
        let slot = 0.8 / m;
        for (k, series) in self.series.iter().enumerate() {
            let color = COLORS[k % COLORS.len()];
            for (i, v) in series.values.iter().enumerate() {
                let Some(v) = v.filter(|v| v.is_finite() && *v > 0.0) else { continue };
                let x0 = i as f64 + 0.1 + k as f64 * slot;
                let x1 = x0 + slot * 0.88;
                let (y0, y1) = if v >= 1.0 { (1.0, v) } else { (v, 1.0) };
                chart
                    .draw_series(std::iter::once(Rectangle::new([(x0, y0), (x1, y1)], color.filled())))
                    .map_err(|e| err(&e))?;
                let (anchor, y) = if v >= 1.0 { (VPos::Bottom, v * 1.04) } else { (VPos::Top, v / 1.04) };
                let style = TextStyle::from(("sans-serif", 11).into_font()).pos(Pos::new(HPos::Center, anchor));
                chart
                    .draw_series(std::iter::once(Text::new((series.text)(v), ((x0 + x1) / 2.0, y), style)))
                    .map_err(|e| err(&e))?;
            }
        }
        // The baseline, over the bars; labelled by the y axis' 1 and by the
        // legend's first entry.
        chart.draw_series(LineSeries::new([(0.0, 1.0), (n, 1.0)], BLACK.stroke_width(2))).map_err(|e| err(&e))?;
        // The legend, in its own strip.
        let top = (header + plot_h) as i32 + 8;
        for (k, (label, &(x, row))) in labels.iter().zip(items.iter()).enumerate() {
            let y = top + 22 * row;
            if k == 0 {
                root.draw(&PathElement::new([(x, y + 8), (x + 14, y + 8)], BLACK.stroke_width(2)))
                    .map_err(|e| err(&e))?;
            } else {
                let color = COLORS[(k - 1) % COLORS.len()];
                root.draw(&Rectangle::new([(x, y + 2), (x + 14, y + 14)], color.filled())).map_err(|e| err(&e))?;
            }
            root.draw(&Text::new(label.to_string(), (x + 20, y + 2), ("sans-serif", 13).into_font()))
                .map_err(|e| err(&e))?;
        }
        root.present().map_err(|e| err(&e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_and_range() {
        assert_eq!(format_ratio(13.18), "×13");
        assert_eq!(format_ratio(2.95), "×3.0");
        assert_eq!(format_ratio(0.74), "×0.74");
        // The baseline is always inside the range, with room above and below.
        assert_eq!(y_range([0.95]), (0.475, 2.0));
        assert_eq!(y_range([38.0, 0.5]), (0.25, 76.0));
        assert_eq!(y_range([f64::NAN, 0.0]), (0.5, 2.0));
        assert_eq!(wrap("aaa bbb ccc", 7), ["aaa bbb", "    ccc"]);
    }
}
