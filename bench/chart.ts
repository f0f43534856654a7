// Draws the benchmark's two latency curves as one SVG: FetchKeys against
// depth (keyset vs offset) and FetchKeyUsage against window length.

interface Series {
  readonly label: string;
  readonly color: string;
  readonly points: readonly (readonly [number, number])[];
}

function panel(x0: number, title: string, xLabel: string, series: readonly Series[]): string {
  const w = 420;
  const h = 260;
  const left = x0 + 50;
  const top = 40;
  const right = x0 + w - 10;
  const bottom = top + h - 60;
  const xs = series.flatMap((s) => s.points.map((p) => p[0]));
  const ys = series.flatMap((s) => s.points.map((p) => p[1]));
  const xMax = Math.max(1, ...xs);
  const yMax = Math.max(0.1, ...ys) * 1.1;
  const px = (x: number) => left + (x / xMax) * (right - left);
  const py = (y: number) => bottom - (y / yMax) * (bottom - top);
  const parts = [
    `<text x="${x0 + w / 2}" y="22" text-anchor="middle" font-weight="bold">${title}</text>`,
    `<line x1="${left}" y1="${bottom}" x2="${right}" y2="${bottom}" stroke="#333"/>`,
    `<line x1="${left}" y1="${top}" x2="${left}" y2="${bottom}" stroke="#333"/>`,
    `<text x="${(left + right) / 2}" y="${bottom + 35}" text-anchor="middle">${xLabel}</text>`,
    `<text x="${x0 + 12}" y="${(top + bottom) / 2}" transform="rotate(-90 ${x0 + 12} ${(top + bottom) / 2})" text-anchor="middle">p50 ms</text>`,
  ];
  for (let i = 0; i <= 4; i++) {
    const y = (yMax * i) / 4;
    parts.push(
      `<text x="${left - 5}" y="${py(y) + 4}" text-anchor="end" font-size="10">${y.toFixed(y < 10 ? 2 : 0)}</text>`,
    );
  }
  for (const x of [...new Set(xs)]) {
    parts.push(`<text x="${px(x)}" y="${bottom + 15}" text-anchor="middle" font-size="10">${x}</text>`);
  }
  series.forEach((s, i) => {
    const d = s.points.map((p, j) => `${j === 0 ? "M" : "L"}${px(p[0]).toFixed(1)},${py(p[1]).toFixed(1)}`).join(" ");
    parts.push(`<path d="${d}" fill="none" stroke="${s.color}" stroke-width="2"/>`);
    for (const p of s.points) parts.push(`<circle cx="${px(p[0])}" cy="${py(p[1])}" r="3" fill="${s.color}"/>`);
    parts.push(`<text x="${left + 10}" y="${top + 14 + i * 16}" fill="${s.color}" font-size="12">${s.label}</text>`);
  });
  return parts.join("\n");
}

/** The SVG document. */
export function renderChart(
  depth: readonly { depth: number; keysetMs: number; offsetMs: number }[],
  windows: readonly { days: number; ms: number }[],
): string {
  const left = panel(0, "FetchKeys: latency against page depth", "keys before the page", [
    { label: "keyset (page token)", color: "#1f77b4", points: depth.map((p) => [p.depth, p.keysetMs]) },
    { label: "offset (skip)", color: "#d62728", points: depth.map((p) => [p.depth, p.offsetMs]) },
  ]);
  const right = panel(440, "FetchKeyUsage (hot key): latency against window", "window, days", [
    { label: "rollup + edge days", color: "#2ca02c", points: windows.map((p) => [p.days, p.ms]) },
  ]);
  return `<svg xmlns="http://www.w3.org/2000/svg" width="880" height="280" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
${left}
${right}
</svg>
`;
}
