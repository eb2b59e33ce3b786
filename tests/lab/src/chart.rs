//! SVG bar charts of the bench's ratios, drawn with plotters' SVG backend. No fonts are
//! needed: the backend writes text as SVG `<text>` elements and the viewer renders them.

use anyhow::{bail, Context, Result};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::path::Path;

/// One series of bars: a ratio per row (None: not measured).
#[derive(Clone, Debug)]
pub struct Series {
    pub name: String,
    pub values: Vec<Option<f64>>,
}

/// Bar colours, one per series in order.
const COLOURS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(127, 127, 127),
];

/// A horizontal grouped bar chart as SVG text: one group of bars per row (top to bottom),
/// one bar per series, the value at the end of each bar, and a red line at `target`.
pub fn ratio_chart_svg(
    title: &str,
    x_desc: &str,
    rows: &[String],
    series: &[Series],
    target: f64,
) -> Result<String> {
    if rows.is_empty() || series.is_empty() {
        bail!("a chart needs at least one row and one series");
    }
    if let Some(s) = series.iter().find(|s| s.values.len() != rows.len()) {
        bail!(
            "series {} has {} values for {} rows",
            s.name,
            s.values.len(),
            rows.len()
        );
    }
    let n = rows.len();
    let k = series.len();
    let highest = series
        .iter()
        .flat_map(|s| s.values.iter().flatten())
        .copied()
        .filter(|v| v.is_finite())
        .fold(target, f64::max);
    let x_max = (highest * 1.15).max(0.1);
    let band = 14 + 16 * k as u32;
    let legend = 22 * k as u32 + 30;
    let (width, height) = (960u32, 80 + n as u32 * band + legend + 50);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (width, height)).into_drawing_area();
        root.fill(&WHITE)?;
        let (plot_area, legend_area) = root.split_vertically(height - legend);
        let mut chart = ChartBuilder::on(&plot_area)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(210)
            .build_cartesian_2d(0f64..x_max, 0f64..n as f64)?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(n)
            .y_label_formatter(&|_| String::new())
            .x_desc(x_desc)
            .x_label_formatter(&|v| format!("{v:.1}"))
            .draw()?;
        let label = ("sans-serif", 13).into_font().color(&BLACK);
        let value = ("sans-serif", 11).into_font().color(&BLACK);
        let bar = 0.8 / k as f64;
        for (i, row) in rows.iter().enumerate() {
            // Row 0 at the top.
            let top = (n - i) as f64 - 0.1;
            let (px, py) = chart.backend_coord(&(0.0, top - 0.4));
            root.draw(&Text::new(
                row.clone(),
                (px - 8, py),
                label.pos(Pos::new(HPos::Right, VPos::Center)),
            ))?;
            for (j, s) in series.iter().enumerate() {
                let Some(v) = s.values[i].filter(|v| v.is_finite()) else {
                    continue;
                };
                let (y1, y0) = (top - j as f64 * bar, top - (j + 1) as f64 * bar);
                let colour = COLOURS[j % COLOURS.len()];
                chart.draw_series(std::iter::once(Rectangle::new(
                    [(0.0, y0 + bar * 0.1), (v, y1 - bar * 0.1)],
                    colour.filled(),
                )))?;
                let (vx, vy) = chart.backend_coord(&(v, (y0 + y1) / 2.0));
                root.draw(&Text::new(
                    format!("{v:.2}"),
                    (vx + 4, vy),
                    value.pos(Pos::new(HPos::Left, VPos::Center)),
                ))?;
            }
        }
        chart.draw_series(std::iter::once(PathElement::new(
            vec![(target, 0.0), (target, n as f64)],
            RED.stroke_width(2),
        )))?;
        let (tx, ty) = chart.backend_coord(&(target, n as f64));
        root.draw(&Text::new(
            format!("target {target:.1}"),
            (tx + 4, ty + 2),
            value.color(&RED).pos(Pos::new(HPos::Left, VPos::Top)),
        ))?;
        // The legend under the plot: a swatch and the series' name per line.
        for (j, s) in series.iter().enumerate() {
            let y = 10 + 22 * j as i32;
            let colour = COLOURS[j % COLOURS.len()];
            legend_area.draw(&Rectangle::new([(230, y), (246, y + 14)], colour.filled()))?;
            legend_area.draw(&Text::new(
                s.name.clone(),
                (254, y + 7),
                label.pos(Pos::new(HPos::Left, VPos::Center)),
            ))?;
        }
        root.present()?;
    }
    Ok(svg)
}

/// Writes `ratio_chart_svg` to `path`, creating its folder.
pub fn write_ratio_chart(
    path: &Path,
    title: &str,
    x_desc: &str,
    rows: &[String],
    series: &[Series],
    target: f64,
) -> Result<()> {
    let svg = ratio_chart_svg(title, x_desc, rows, series, target)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(path, svg).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows() -> Vec<String> {
        [
            "randread-4k-qd1 read",
            "seqwrite-128k-qd8 write",
            "verify-crc32c read",
        ]
        .map(String::from)
        .to_vec()
    }

    #[test]
    fn chart_is_valid_svg_naming_every_row_and_series() {
        let series = vec![
            Series {
                name: "vmm / qemu (aio=threads)".into(),
                values: vec![Some(2.2), Some(0.4), None],
            },
            Series {
                name: "vmm / qemu-io_uring".into(),
                values: vec![Some(1.1), Some(f64::NAN), Some(0.9)],
            },
        ];
        let dir = vmm_lab::guest::Scratch::new("chart-test").unwrap();
        let path = dir.path().join("sub/chart.svg");
        write_ratio_chart(&path, "vmm / QEMU", "ratio", &rows(), &series, 1.0).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        let doc = roxmltree::Document::parse(&svg).expect("well-formed XML");
        assert_eq!(doc.root_element().tag_name().name(), "svg");
        let texts: Vec<&str> = doc
            .descendants()
            .filter(|n| n.has_tag_name("text"))
            .filter_map(|n| n.text().map(str::trim))
            .collect();
        for name in rows().iter().chain(series.iter().map(|s| &s.name)) {
            assert!(texts.contains(&name.as_str()), "{name} not in {texts:?}");
        }
        // A value at the end of every measured, finite bar; none for the others.
        for v in ["2.20", "0.40", "1.10", "0.90", "target 1.0"] {
            assert!(texts.contains(&v), "{v} not in {texts:?}");
        }
        assert!(!texts.iter().any(|t| t.contains("NaN")), "{texts:?}");
        let bars = doc.descendants().filter(|n| n.has_tag_name("rect")).count();
        // Background, 4 bars, 2 legend swatches, at least.
        assert!(bars >= 7, "{bars} rects");
    }

    #[test]
    fn mismatched_series_is_an_error() {
        let bad = [Series {
            name: "x".into(),
            values: vec![Some(1.0)],
        }];
        assert!(ratio_chart_svg("t", "x", &rows(), &bad, 1.0).is_err());
        assert!(ratio_chart_svg("t", "x", &[], &[], 1.0).is_err());
    }
}
