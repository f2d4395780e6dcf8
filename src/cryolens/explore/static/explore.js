// The explorer's page: the map (regl-scatterplot, WebGL), the particle panel, selections and
// exports, all through the API under /api (docs/explore.md). The page reports what it drew in
// <body data-points-drawn="N" data-state="ready">, for people and for tests.
import createScatterplot from './vendor/regl-scatterplot.js';

const $ = (id) => document.getElementById(id);
const PALETTE = ['#4e9af1', '#f28e2b', '#59c26b', '#e15759', '#b07aa1', '#edc948', '#76b7b2',
  '#ff9da7', '#9c755f', '#bab0ac', '#1f78b4', '#33a02c', '#fb9a99', '#fdbf6f', '#cab2d6',
  '#a6cee3', '#b2df8a', '#ff7f00', '#6a3d9a', '#e31a1c'];
const RAMP = ['#440154', '#482878', '#3e4989', '#31688e', '#26828e', '#1f9e89', '#35b779',
  '#6ece58', '#b5de2b', '#fde725'];
const NO_COLOUR = '#7aa6ff';

const state = {
  table: null, x: null, y: null, values: null, zType: undefined, colors: NO_COLOUR,
  column: null, selected: [], lassoing: false, panelRow: null, rows: new Map(), plot: null,
  timings: {},  // ms since the page started loading, per step of the first drawing
};

function mark(step) {
  if (!(step in state.timings)) state.timings[step] = Math.round(performance.now());
}

async function api(path, options) {
  const response = await fetch(path, options);
  if (!response.ok) {
    let detail = `${response.status} ${response.statusText}`;
    try { detail = (await response.json()).detail; } catch { /* not JSON */ }
    throw new Error(detail);
  }
  return response;
}

function status(text, error = false) {
  $('status').textContent = text;
  $('status').className = error ? 'error' : '';
}

function postJSON(body) {
  return { method: 'POST', headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify(body) };
}

function ramp(steps) {
  const out = [];
  for (let i = 0; i < steps; i += 1) out.push(RAMP[Math.round(i / (steps - 1) * (RAMP.length - 1))]);
  return out;
}

// -- the map --------------------------------------------------------------------------------
async function loadLayout(method) {
  status(`computing the ${method} layout…`);
  const response = await api(`/api/layout?method=${encodeURIComponent(method)}`);
  const xy = new Float32Array(await response.arrayBuffer());
  const n = xy.length / 2;
  state.x = new Float32Array(n);
  state.y = new Float32Array(n);
  for (let i = 0; i < n; i += 1) { state.x[i] = xy[2 * i]; state.y[i] = xy[2 * i + 1]; }
  mark('layout received');
  const info = JSON.parse(response.headers.get('X-Layout') || '{}');
  const how = info.explained ? ` (${info.explained.map((v) => `${Math.round(100 * v)} %`)
    .join(' + ')} of the variance)` : (info.cached ? ' (cached)' : '');
  status(`${method.toUpperCase()}${how}`);
}

async function draw() {
  const points = { x: state.x, y: state.y };
  if (state.values) points.valueA = state.values;
  state.plot.set({ colorBy: state.values ? 'valueA' : null, pointColor: state.colors });
  mark('draw called');
  await state.plot.draw(points, { zDataType: state.zType, select: state.selected });
  mark('drawn');
  // what the scatterplot holds now, not what was asked of it
  document.body.dataset.pointsDrawn = state.plot.get('isPointsDrawn')
    ? String(state.plot.get('points').length) : '0';
}

async function colourBy(name) {
  state.column = null;
  state.values = null;
  state.zType = undefined;
  state.colors = NO_COLOUR;
  if (name) {
    const column = await (await api(`/api/column/${encodeURIComponent(name)}`)).json();
    if (column.kind === 'text') {
      status(`${name} has too many distinct values to colour by`, true);
    } else {
      const raw = new Float32Array(await (await api(`/api/values/${encodeURIComponent(name)}`))
        .arrayBuffer());
      if (column.kind === 'category') {
        state.values = raw;
        state.zType = 'categorical';
        state.colors = column.categories.map((_, i) => PALETTE[i % PALETTE.length]);
        if (state.colors.length === 1) state.colors.push(PALETTE[1]);  // a list needs two
      } else {
        const span = column.max - column.min || 1;
        state.values = raw.map((v) => (Number.isFinite(v) ? (v - column.min) / span : 0));
        state.zType = 'continuous';
        state.colors = ramp(64);
      }
      state.column = column;
    }
  }
  mark('colours received');
  legend();
  await draw();
}

function legend() {
  const box = $('legend');
  box.replaceChildren();
  const column = state.column;
  if (!column) return;
  const title = document.createElement('div');
  title.textContent = column.name;
  box.append(title);
  if (column.kind === 'number') {
    const bar = document.createElement('div');
    bar.className = 'bar';
    bar.style.background = `linear-gradient(to right, ${RAMP.join(', ')})`;
    const scale = document.createElement('div');
    scale.textContent = `${column.min.toPrecision(3)} … ${column.max.toPrecision(3)}`;
    box.append(bar, scale);
    return;
  }
  column.categories.forEach((name, code) => {
    const item = document.createElement('div');
    item.className = 'item';
    item.title = `select the ${column.counts[code]} rows of ${name}`;
    const swatch = document.createElement('span');
    swatch.className = 'swatch';
    swatch.style.background = state.colors[code];
    item.append(swatch, `${name} (${column.counts[code]})`);
    item.addEventListener('click', () => {
      const rows = [];
      state.values.forEach((v, i) => { if (v === code) rows.push(i); });
      state.plot.select(rows);
    });
    box.append(item);
  });
}

// -- hover, click and the particle panel ----------------------------------------------------
async function rowValues(row) {
  if (!state.rows.has(row)) {
    state.rows.set(row, (await (await api(`/api/rows/${row}`)).json()).values);
  }
  return state.rows.get(row);
}

function describe(row, values) {
  const where = values.run ? `${values.run} · ${values.object ?? ''}`
    : `${(values.source ?? '').split('/').pop()} #${values.index ?? ''}`;
  const xyz = ['x_angstrom', 'y_angstrom', 'z_angstrom'].map((c) => values[c]);
  const at = xyz.every((v) => v !== null && v !== undefined)
    ? `\n(${xyz.map((v) => Math.round(v)).join(', ')}) Å` : '';
  return `row ${row}: ${where}${at}`;
}

let mouse = { x: 0, y: 0 };
async function tooltip(row) {
  const tip = $('tooltip');
  tip.dataset.row = String(row);
  const values = await rowValues(row).catch(() => null);
  if (tip.dataset.row !== String(row) || !values) return;
  tip.textContent = describe(row, values);
  tip.style.left = `${mouse.x + 12}px`;
  tip.style.top = `${mouse.y + 12}px`;
  tip.hidden = false;
}

async function openPanel(row) {
  state.panelRow = row;
  const panel = $('panel');
  $('panel-help').hidden = true;
  $('panel-body').hidden = false;
  panel.dataset.row = String(row);
  delete panel.dataset.neighbours;
  $('panel-title').textContent = `row ${row}`;
  $('particle-image').src = `/api/particle/${row}.png`;
  const recon = $('reconstruction-image');
  if (state.table.reconstruction) {
    recon.hidden = false;
    recon.src = `/api/reconstruction/${row}.png`;
    $('reconstruction-caption').textContent =
      `reconstruction z | y | x (${state.table.reconstruction})`;
  } else {
    recon.hidden = true;
    $('reconstruction-caption').textContent = 'no model to reconstruct with (--checkpoint)';
  }
  const info = $('panel-info');
  info.replaceChildren();
  const values = await rowValues(row);
  for (const [key, value] of Object.entries(values)) {
    if (value === null || key === 'particle_key') continue;
    const dt = document.createElement('dt');
    const dd = document.createElement('dd');
    dt.textContent = key;
    dd.textContent = typeof value === 'number' && !Number.isInteger(value)
      ? value.toPrecision(5) : String(value);
    info.append(dt, dd);
  }
  await neighbours(row);
}

async function neighbours(row) {
  const k = Math.max(1, Math.min(Number($('k').value) || 8, state.table.max_k));
  const got = await (await api(`/api/neighbours/${row}?k=${k}`)).json();
  if (state.panelRow !== row) return;
  const box = $('neighbours');
  box.replaceChildren();
  got.rows.forEach((other, i) => {
    const button = document.createElement('button');
    button.dataset.row = String(other);
    const img = document.createElement('img');
    img.src = `/api/particle/${other}.png?scale=1`;
    img.alt = `row ${other}`;
    button.append(img, `row ${other} · d ${got.distances[i].toPrecision(3)}`);
    button.addEventListener('click', () => openPanel(other));
    box.append(button);
  });
  $('panel').dataset.neighbours = String(got.rows.length);
}

// -- selections, search, clusters, exports --------------------------------------------------
function selectionChanged(rows) {
  state.selected = rows;
  const n = rows.length;
  $('selection-count').textContent = n ? `${n} selected` : 'nothing selected';
  document.body.dataset.selected = String(n);
  for (const id of ['export-csv', 'export-parquet', 'export-copick']) $(id).disabled = !n;
}

async function download(kind) {
  const response = await api(`/api/export/${kind}`, postJSON({ rows: state.selected }));
  const name = /filename="([^"]+)"/.exec(response.headers.get('Content-Disposition') || '');
  const link = document.createElement('a');
  link.href = URL.createObjectURL(await response.blob());
  link.download = name ? name[1] : `selection.${kind}`;
  link.click();
  URL.revokeObjectURL(link.href);
  status(`exported ${state.selected.length} rows as ${kind}`);
}

async function writePicks() {
  const body = { rows: state.selected, object: $('copick-object').value,
    user_id: $('copick-user').value, session_id: $('copick-session').value };
  const got = await (await api('/api/export/copick', postJSON(body))).json();
  const runs = Object.keys(got.runs).length;
  status(`wrote ${got.picks} picks of ${got.object} in ${runs} run${runs === 1 ? '' : 's'} ` +
    `as ${got.user_id} / ${got.session_id}`);
  $('status').dataset.picks = String(got.picks);
}

async function search(event) {
  event.preventDefault();
  const q = $('search').value.trim();
  if (!q) return;
  const got = await (await api(`/api/search?q=${encodeURIComponent(q)}`)).json();
  state.plot.select(got.rows);
  status(`${got.total} rows match ${q}`);
  if (got.rows.length === 1) openPanel(got.rows[0]);
}

async function cluster() {
  const method = $('cluster-method').value;
  const number = Number($('cluster-k').value);
  status(`clustering (${method})…`);
  const column = await (await api('/api/cluster', postJSON(
    { method, k: number, min_cluster_size: number }))).json();
  if (![...$('color').options].some((o) => o.value === column.name)) {
    $('color').append(new Option(column.name, column.name));
  }
  $('color').value = column.name;
  await colourBy(column.name);
  status(`${column.categories.length} clusters: ${column.name}`);
}

function mode(name) {
  for (const m of ['pan', 'lasso', 'box']) $(`mode-${m}`).classList.toggle('on', m === name);
  state.plot.set(name === 'pan' ? { mouseMode: 'panZoom' }
    : { mouseMode: 'lasso', lassoType: name === 'box' ? 'rectangle' : 'freeform' });
}

// -- start ----------------------------------------------------------------------------------
function guard(action) {
  return (...args) => Promise.resolve(action(...args)).catch((error) => status(error.message, true));
}

async function start() {
  const table = await (await api('/api/table')).json();
  mark('table described');
  state.table = table;
  $('title').textContent = `${table.name}: ${table.rows.toLocaleString()} rows, ` +
    `${table.dims}-d embeddings`;
  for (const [method, ok] of Object.entries(table.layouts)) {
    if (ok) $('layout').append(new Option(method.toUpperCase(), method));
  }
  $('color').append(new Option('(none)', ''));
  for (const name of table.columns) $('color').append(new Option(name, name));
  $('color').value = table.default_color || '';
  if (table.copick) {
    $('copick-export').hidden = false;
    for (const name of table.copick.objects) $('copick-object').append(new Option(name, name));
    $('copick-session').value = `${Date.now() % 100000}`;
  }
  const canvas = $('canvas');
  const size = table.rows > 200000 ? 1.5 : (table.rows > 20000 ? 3 : 6);
  state.plot = createScatterplot({ canvas, pointSize: size,
    pointSizeSelected: 2, pointColor: NO_COLOUR, pointColorActive: '#ffffff',
    backgroundColor: '#15171c', lassoColor: '#ffd166', lassoMinDelay: 5, lassoMinDist: 2 });
  state.plot.subscribe('pointOver', (row) => guard(tooltip)(row));
  state.plot.subscribe('pointOut', () => { $('tooltip').hidden = true; delete $('tooltip').dataset.row; });
  state.plot.subscribe('lassoStart', () => { state.lassoing = true; });
  state.plot.subscribe('select', ({ points }) => {
    const rows = [...points];
    selectionChanged(rows);
    if (rows.length === 1 && !state.lassoing) guard(openPanel)(rows[0]);
    state.lassoing = false;
  });
  state.plot.subscribe('deselect', () => selectionChanged([]));
  canvas.addEventListener('mousemove', (event) => { mouse = { x: event.offsetX, y: event.offsetY }; });
  const asked = new URLSearchParams(window.location.search);  // ?layout=umap&color=run
  if (asked.has('layout')) $('layout').value = asked.get('layout');
  if (asked.has('color')) $('color').value = asked.get('color');
  await loadLayout($('layout').value || 'pca');
  await colourBy($('color').value);
  $('layout').addEventListener('change', guard(async () => {
    await loadLayout($('layout').value);
    await draw();
  }));
  $('color').addEventListener('change', guard(() => colourBy($('color').value)));
  for (const m of ['pan', 'lasso', 'box']) $(`mode-${m}`).addEventListener('click', () => mode(m));
  $('search-form').addEventListener('submit', guard(search));
  $('cluster-run').addEventListener('click', guard(cluster));
  $('export-csv').addEventListener('click', guard(() => download('csv')));
  $('export-parquet').addEventListener('click', guard(() => download('parquet')));
  $('export-copick').addEventListener('click', guard(writePicks));
  $('k').addEventListener('change', guard(() => state.panelRow !== null && neighbours(state.panelRow)));
  for (const [id, what] of [['particle-image', 'particle'], ['reconstruction-image', 'reconstruction']]) {
    $(id).addEventListener('error', () => {
      const url = $(id).src;
      api(url).catch((error) => status(`${what}: ${error.message}`, true));
    });
  }
  $('panel-close').addEventListener('click', () => {
    $('panel-body').hidden = true;
    $('panel-help').hidden = false;
    delete $('panel').dataset.row;
    state.panelRow = null;
  });
  window.explorer = state;  // for the console (and tests): state.plot is the scatterplot
  document.body.dataset.state = 'ready';
}

guard(start)().then(() => {
  if (document.body.dataset.state !== 'ready') document.body.dataset.state = 'failed';
});
