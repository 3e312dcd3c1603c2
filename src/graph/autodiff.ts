// Reverse-mode differentiation over the graph IR (builder.ts): given a scalar loss and the values to
// differentiate (the LoRA inputs), appends the backward nodes and one gradient output per value.
// ONE rule per op in RULES below: a new op in the model needs only its rule. Gradients that reach a
// value from several consumers are summed (as llm.c accumulates). Only paths from the wanted values
// to the loss are differentiated; frozen weights (fp32, 4-bit) never get gradients.
//
// The table knows no storage format: a format's own ops (the 4-bit MatMulBnb4 / MatMulNBits) get their
// rules from the module that emits their forward (src/quant/ops.ts), through `registerRule`. Rules may
// add runtime-fed constants (RuleContext.feed, e.g. codebooks kept out of ORT's constant folding):
// `runtimeFeeds` holds their values.
//
// Optional recomputation (gradient checkpointing): nodes are grouped in segments (e.g. one per decoder
// layer); each segment's forward is emitted again right before its backward, behind a data dependency
// on the incoming gradient, so only segment boundaries stay alive between forward and backward.
import { Graph, numel, type AttrValue, type Dim, type DType, type Node, type TypedData, type Value } from './builder.js';
import { EdgeloraError } from '../util/errors.js';

/** Options of one differentiation; a format module may add the options its own rules read (src/quant/ops.ts). */
export interface AutodiffOptions {
  /** Segment of a forward node for recomputation (e.g. "layers.3"), or null to keep its outputs. */
  readonly segmentOf?: (node: Node) => string | null;
  /** Gradient output name for a differentiated value; default `grad.<name>`. */
  readonly gradName?: (name: string) => string;
  /**
   * The gradient of `loss` when it is not a scalar loss but an intermediate value whose gradient the caller
   * computed itself (same shape), e.g. the hidden state under a chunked lm_head + loss. Default: 1.
   */
  readonly seed?: Value;
}

export interface RuntimeFeed {
  readonly dtype: DType;
  readonly shape: number[];
  readonly data: TypedData;
}

export interface AutodiffResult {
  /** Gradient output value by differentiated value name. */
  readonly grads: Map<string, Value>;
  /** Inputs the backward added that the caller must feed with these values on every run. */
  readonly runtimeFeeds: Map<string, RuntimeFeed>;
  /** Nodes appended (backward + recomputation). */
  readonly nodesAdded: number;
}

/** What a rule sees of one forward node. x/y return recomputed values inside a recomputed segment. */
export interface RuleContext {
  readonly g: Graph;
  readonly node: Node;
  x(i: number): Value;
  y(i: number): Value;
  /** Gradient of output i, or null when no gradient reaches it. */
  dy(i: number): Value | null;
  /** Whether input i needs a gradient. */
  needs(i: number): boolean;
  attrInt(name: string, def: number): number;
  /** int64 values of a constant initializer input (axes, shapes). */
  constInts(i: number): number[];
  /** A runtime-fed constant (kept out of ORT's constant folding). */
  feed(name: string, dtype: DType, shape: number[], data: TypedData): Value;
  readonly opts: AutodiffOptions;
}

/** Gradients of the inputs, by input index (null/undefined: none). */
export type GradRule = (c: RuleContext) => (Value | null | undefined)[];

const isNum = (d: Dim): d is number => typeof d === 'number';
const ints = (value: number[]): AttrValue => ({ kind: 'ints', value });
const int = (value: number): AttrValue => ({ kind: 'int', value });

/** Sums `d` (shaped like a broadcast result) down to `target`'s shape (numpy broadcasting reversed). */
export function sumToShape(g: Graph, d: Value, target: Value): Value {
  const lead = d.shape.length - target.shape.length;
  let out = d;
  if (lead > 0) out = g.reduce('ReduceSum', out, [...Array(lead).keys()], false);
  const axes: number[] = [];
  target.shape.forEach((t, i) => {
    if (t === 1 && out.shape[i] !== 1) axes.push(i);
  });
  if (axes.length > 0) out = g.reduce('ReduceSum', out, axes, true);
  return out;
}

/**
 * Reshapes `d` to `x`'s shape: a static spec when x's shape can be expressed against d's (numbers,
 * copied symbols, at most one inferred), otherwise x's runtime shape (a Shape node placed right
 * after x is produced, so x itself need not stay alive for it).
 */
function reshapeLike(g: Graph, d: Value, x: Value): Value {
  let inferred = 0;
  const spec = x.shape.map((dim, i) => {
    if (isNum(dim)) return dim;
    if (d.shape[i] === dim) return 0;
    inferred++;
    return -1;
  });
  if (inferred <= 1) return g.node('Reshape', [d, g.constI64(spec)], [{ dtype: d.dtype, shape: [...x.shape] }])[0]!;
  return g.reshapeTo(d, earlyShapeOf(g, x), [...x.shape]);
}

function earlyShapeOf(g: Graph, x: Value): Value {
  const s = g.shapeOf(x);
  const node = g.nodes.pop()!;
  const at = g.nodes.findIndex((n) => n.outputs.includes(x.name));
  g.nodes.splice(at + 1, 0, node); // at = -1 (graph input): first
  return s;
}

function fusedMatMul(g: Graph, a: Value, b: Value, transA: boolean, transB: boolean): Value {
  const ar = a.shape.length;
  const br = b.shape.length;
  const m = transA ? a.shape[ar - 1]! : a.shape[ar - 2]!;
  const n = transB ? b.shape[br - 2]! : b.shape[br - 1]!;
  const batch = g.broadcast(a.shape.slice(0, -2), b.shape.slice(0, -2), 'FusedMatMul');
  return g.contrib('FusedMatMul', [a, b], a.dtype, [...batch, m, n], {
    transA: int(transA ? 1 : 0),
    transB: int(transB ? 1 : 0),
    alpha: { kind: 'float', value: 1 },
  });
}

/**
 * `packed` again, but only once `dy` exists (Where on a condition computed from dy, both branches `packed`). A
 * dequantizer starts from initializers and runtime feeds only, so ORT may run it as early as it likes: every
 * layer's float weight (and its int32 codes) would then sit in memory from the start of the step to its use in the
 * backward. Fenced, each float copy lives from its dequantization to its one MatMul.
 */
export function afterGradient(g: Graph, packed: Value, dy: Value): Value {
  const first = g.reshape(g.slice(g.reshape(dy, ['n*']), 0, 0, 1, 1), [1]);
  const cond = g.node('IsNaN', [first], [{ dtype: 'bool', shape: [1] }])[0]!;
  return g.node('Where', [cond, packed, packed], [{ dtype: packed.dtype, shape: [...packed.shape] }])[0]!;
}

function unary(fn: (c: RuleContext, dy: Value) => Value): GradRule {
  return (c) => {
    const dy = c.dy(0);
    return [dy && c.needs(0) ? fn(c, dy) : null];
  };
}

/** One rule per op: the generic ops here, a format's own ops added by registerRule. */
export const RULES: Record<string, GradRule> = {
  Identity: unary((_c, dy) => dy),
  Cast: unary((c, dy) => (c.x(0).dtype === dy.dtype ? dy : c.g.cast(dy, c.x(0).dtype))),
  Neg: unary((c, dy) => c.g.neg(dy)),
  Sqrt: unary((c, dy) => c.g.div(c.g.mul(dy, c.g.constF32([0.5], [1])), c.y(0))),
  Reciprocal: unary((c, dy) => c.g.neg(c.g.mul(dy, c.g.mul(c.y(0), c.y(0))))),
  Sigmoid: unary((c, dy) => {
    const y = c.y(0);
    return c.g.mul(dy, c.g.mul(y, c.g.sub(c.g.constF32([1], [1]), y)));
  }),
  Exp: unary((c, dy) => c.g.mul(dy, c.y(0))),
  Log: unary((c, dy) => c.g.div(dy, c.x(0))),
  Add: (c) => {
    const dy = c.dy(0);
    if (!dy) return [];
    return [c.needs(0) ? sumToShape(c.g, dy, c.x(0)) : null, c.needs(1) ? sumToShape(c.g, dy, c.x(1)) : null];
  },
  Sub: (c) => {
    const dy = c.dy(0);
    if (!dy) return [];
    return [c.needs(0) ? sumToShape(c.g, dy, c.x(0)) : null, c.needs(1) ? sumToShape(c.g, c.g.neg(dy), c.x(1)) : null];
  },
  Mul: (c) => {
    const dy = c.dy(0);
    if (!dy) return [];
    const { g } = c;
    return [c.needs(0) ? sumToShape(g, g.mul(dy, c.x(1)), c.x(0)) : null, c.needs(1) ? sumToShape(g, g.mul(dy, c.x(0)), c.x(1)) : null];
  },
  Div: (c) => {
    const dy = c.dy(0);
    if (!dy) return [];
    const { g } = c;
    return [
      c.needs(0) ? sumToShape(g, g.div(dy, c.x(1)), c.x(0)) : null,
      c.needs(1) ? sumToShape(g, g.neg(g.div(g.mul(dy, c.y(0)), c.x(1))), c.x(1)) : null,
    ];
  },
  Where: (c) => {
    const dy = c.dy(0);
    if (!dy) return [];
    const { g } = c;
    const zero = g.constF32([0], [1]);
    return [null, c.needs(1) ? sumToShape(g, g.where(c.x(0), dy, zero), c.x(1)) : null, c.needs(2) ? sumToShape(g, g.where(c.x(0), zero, dy), c.x(2)) : null];
  },
  Softmax: unary((c, dy) => {
    const { g } = c;
    const y = c.y(0);
    const axis = c.attrInt('axis', -1);
    return g.mul(y, g.sub(dy, g.reduce('ReduceSum', g.mul(dy, y), [axis], true)));
  }),
  ReduceSum: (c) => reduceRule(c, false),
  ReduceMean: (c) => reduceRule(c, true),
  Reshape: unary((c, dy) => reshapeLike(c.g, dy, c.x(0))),
  Unsqueeze: unary((c, dy) => reshapeLike(c.g, dy, c.x(0))),
  Squeeze: unary((c, dy) => reshapeLike(c.g, dy, c.x(0))),
  Transpose: unary((c, dy) => {
    const perm = (c.node.attrs.perm as { value: number[] } | undefined)?.value ?? [...Array(dy.shape.length).keys()].reverse();
    const inv = new Array<number>(perm.length);
    perm.forEach((p, i) => (inv[p] = i));
    return c.g.transpose(dy, inv);
  }),
  Concat: (c) => {
    const dy = c.dy(0);
    if (!dy) return [];
    const r = dy.shape.length;
    const axis = ((c.attrInt('axis', 0) % r) + r) % r;
    let at = 0;
    return c.node.inputs.map((_, i) => {
      const d = c.x(i).shape[axis]!;
      if (!isNum(d)) return c.g.fail(`Concat gradient needs static sizes on axis ${axis}, input ${i} has "${d}"`);
      const out = c.needs(i) ? c.g.slice(dy, axis, at, at + d, d) : null;
      at += d;
      return out;
    });
  },
  MatMul: (c) => {
    const dy = c.dy(0);
    if (!dy) return [];
    const { g } = c;
    const a = c.x(0);
    const b = c.x(1);
    let da: Value | null = null;
    let db: Value | null = null;
    if (c.needs(0)) da = sumToShape(g, fusedMatMul(g, dy, b, false, true), a); // dY·Bᵀ
    if (c.needs(1)) {
      if (b.shape.length === 2 && a.shape.length > 2) {
        // A weight shared over the batch: fold the batch into rows, one [K, BT]·[BT, N] product.
        const K = a.shape[a.shape.length - 1]!;
        const N = dy.shape[dy.shape.length - 1]!;
        db = fusedMatMul(g, g.reshape(a, ['BT*', K]), g.reshape(dy, ['BT*', N]), true, false);
      } else {
        db = sumToShape(g, fusedMatMul(g, a, dy, true, false), b); // Aᵀ·dY
      }
    }
    return [da, db];
  },
  Gemm: (c) => {
    const dy = c.dy(0);
    if (!dy) return [];
    const { g } = c;
    if (c.attrInt('transA', 0) !== 0) g.fail('Gemm gradient: transA=1 is not supported');
    const alpha = (c.node.attrs.alpha as { value: number } | undefined)?.value ?? 1;
    const transB = c.attrInt('transB', 0) === 1;
    const d = alpha === 1 ? dy : g.mul(dy, g.constF32([alpha], [1]));
    const da = c.needs(0) ? (transB ? g.matmul(d, c.x(1)) : fusedMatMul(g, d, c.x(1), false, true)) : null;
    const db = c.needs(1) ? (transB ? fusedMatMul(g, d, c.x(0), true, false) : fusedMatMul(g, c.x(0), d, true, false)) : null;
    let dc: Value | null = null;
    if (c.node.inputs.length > 2 && c.node.inputs[2] && c.needs(2)) {
      const beta = (c.node.attrs.beta as { value: number } | undefined)?.value ?? 1;
      dc = sumToShape(g, beta === 1 ? dy : g.mul(dy, g.constF32([beta], [1])), c.x(2));
    }
    return [da, db, dc];
  },
  Gather: (c) => {
    if (c.needs(0)) c.g.fail(`gradient through the table of Gather ${c.node.name} (e.g. a trainable embedding) is not supported`);
    return [];
  },
  SoftmaxCrossEntropyLoss: (c) => {
    // scores [N, V], labels [N] int64; outputs loss (reduction 'sum' or 'none') and log_prob [N, V].
    const dy = c.dy(0);
    if (!dy || !c.needs(0)) return [];
    const { g } = c;
    if (c.node.outputs.length < 2) g.fail('SoftmaxCrossEntropyLoss gradient needs its log_prob output (emit it)');
    if (c.node.inputs.length > 2 && c.node.inputs[2]) g.fail('SoftmaxCrossEntropyLoss gradient: class weights are not supported');
    const red = (c.node.attrs.reduction as { value: string } | undefined)?.value ?? 'mean';
    if (red !== 'sum' && red !== 'none') g.fail(`SoftmaxCrossEntropyLoss gradient: reduction "${red}" (use "sum" or "none")`);
    const scores = c.x(0);
    const labels = c.x(1);
    if (scores.shape.length !== 2) g.fail('SoftmaxCrossEntropyLoss gradient: scores must be [N, V]');
    const V = scores.shape[1]!;
    if (!isNum(V)) return g.fail('SoftmaxCrossEntropyLoss gradient: V must be static');
    const ignore = c.attrInt('ignore_index', Number.NaN);
    let keep: Value | null = null;
    let safe = labels;
    if (!Number.isNaN(ignore)) {
      const ign = g.constI64([ignore], [1]);
      keep = g.cast(g.node('Not', [g.equal(labels, ign)], [{ dtype: 'bool', shape: [...labels.shape] }])[0]!, 'float32');
      safe = g.where(g.equal(labels, ign), g.constI64([0], [1]), labels);
    }
    const onehot = g.node('OneHot', [safe, g.constI64([V], [1]), g.constF32([0, 1], [2])], [{ dtype: 'float32', shape: [...labels.shape, V] }], { axis: int(-1) })[0]!;
    let d = g.sub(g.exp(c.y(1)), onehot); // softmax − onehot, [N, V]
    let scale = red === 'sum' ? dy : g.unsqueeze(dy, [1]); // [] or [N, 1]
    if (keep) scale = g.mul(g.unsqueeze(keep, [1]), scale);
    d = g.mul(d, scale);
    return [d];
  },
};

/**
 * Adds the rule for `op` to RULES: how a module that emits an op outside this generic table (a quant format's
 * MatMulBnb4, MatMulNBits) contributes its gradient, beside its forward. One rule per op: a second, different
 * rule for the same op is a programming error.
 */
export function registerRule(op: string, rule: GradRule): void {
  const had = RULES[op];
  if (had && had !== rule) throw new Error(`autodiff: a gradient rule for ${op} is already registered`);
  RULES[op] = rule;
}

function reduceRule(c: RuleContext, mean: boolean): (Value | null)[] {
  let dy = c.dy(0);
  if (!dy || !c.needs(0)) return [];
  const { g } = c;
  const x = c.x(0);
  const r = x.shape.length;
  const axes = c.node.inputs.length > 1 && c.node.inputs[1] ? c.constInts(1).map((a) => (a < 0 ? a + r : a)) : [...Array(r).keys()];
  if (c.attrInt('keepdims', 1) === 0) dy = g.unsqueeze(dy, axes);
  let n = 1;
  const staticAxes = axes.every((a) => isNum(x.shape[a]!));
  for (const a of axes) n *= isNum(x.shape[a]!) ? (x.shape[a] as number) : 1;
  if (mean) {
    if (!staticAxes) g.fail('ReduceMean gradient needs static sizes on the reduced axes');
    dy = g.mul(dy, g.constF32([1 / n], [1]));
  }
  // Expand broadcasts bidirectionally: 1 on kept axes, the size on reduced ones.
  const shape = staticAxes ? g.constI64(x.shape.map((d, i) => (axes.includes(i) ? (d as number) : 1))) : earlyShapeOf(g, x);
  return [g.node('Expand', [dy, shape], [{ dtype: dy.dtype, shape: [...x.shape] }])[0]!];
}

/**
 * Appends the backward of `loss` (a scalar-shaped value) with respect to `wrt` and returns the
 * gradient outputs (added as graph outputs named by opts.gradName).
 */
export function differentiate(g: Graph, loss: Value, wrt: readonly Value[], opts: AutodiffOptions = {}): AutodiffResult {
  const before = g.nodes.length;
  const forward = [...g.nodes];
  const producer = new Map<string, number>();
  forward.forEach((n, i) => n.outputs.forEach((o) => producer.set(o, i)));
  if (!opts.seed && numel(loss.shape.map((d) => (isNum(d) ? d : 2))) !== 1) g.fail(`loss ${loss.name} must be a single element, shape [${loss.shape}]`);

  // Values that depend on a wanted value (forward sweep) ...
  const dep = new Set(wrt.map((v) => v.name));
  for (const n of forward) if (n.inputs.some((i) => dep.has(i))) n.outputs.forEach((o) => dep.add(o));
  if (!dep.has(loss.name)) g.fail(`loss ${loss.name} does not depend on any of the values to differentiate`);
  // ... and from which the loss is reachable (backward sweep): the active subgraph.
  const reach = new Set([loss.name]);
  const active: number[] = [];
  for (let i = forward.length - 1; i >= 0; i--) {
    const n = forward[i]!;
    if (!n.outputs.some((o) => reach.has(o)) || !n.inputs.some((x) => dep.has(x))) continue;
    active.push(i);
    n.inputs.forEach((x) => dep.has(x) && reach.add(x));
  }
  for (const w of wrt) if (!reach.has(w.name)) g.fail(`no path from ${w.name} to the loss ${loss.name}`);

  const runtimeFeeds = new Map<string, RuntimeFeed>();
  const feed = (name: string, dtype: DType, shape: number[], data: TypedData): Value => {
    if (!runtimeFeeds.has(name)) {
      runtimeFeeds.set(name, { dtype, shape, data });
      g.input(name, dtype, shape);
    }
    return g.value(name);
  };

  const pending = new Map<string, Value[]>();
  // Gradient contributions to the wanted values (the LoRA weights) not yet fenced into a recomputation: they
  // lead only to graph outputs, so ORT's order may put their products at the very end, keeping every layer's
  // [B·T, F] operands alive through the whole backward (measured: ~50 MB a layer at 512 tokens). The next
  // segment's recomputation waits for them (see recompute), so each layer's are computed before the next starts.
  const wrtNames = new Set(wrt.map((v) => v.name));
  let unfenced: Value[] = [];
  const pushGrad = (name: string, d: Value) => {
    if (wrtNames.has(name)) unfenced.push(d);
    const list = pending.get(name) ?? [];
    list.push(d);
    pending.set(name, list);
  };
  const takeGrad = (name: string): Value | null => {
    const list = pending.get(name);
    if (!list || list.length === 0) return null;
    let s = list[0]!;
    for (let i = 1; i < list.length; i++) s = g.add(s, list[i]!);
    pending.set(name, [s]);
    return s;
  };
  pushGrad(loss.name, opts.seed ?? g.withScope('grad', () => g.constF32([1], loss.shape.map(() => 1))));

  // Recomputation: per segment, a map from original value names to recomputed ones.
  const segOf = (i: number) => opts.segmentOf?.(forward[i]!) ?? null;
  const remap = new Map<string, string>();
  const recomputed = new Set<string>();
  const recompute = (seg: string, barrier: Value) => {
    recomputed.add(seg);
    const members = forward.map((_, i) => i).filter((i) => segOf(i) === seg);
    const inSeg = new Set(members.flatMap((i) => forward[i]!.outputs));
    // A zero that depends on the incoming gradient and on the wanted values' gradients of the segments
    // already done: adding it to the segment's activations from outside orders the recomputation after
    // them (and keeps ORT from merging the copy with the original).
    const first = (v: Value) => g.reshape(g.slice(g.reshape(v, ['n*']), 0, 0, 1, 1), [1]);
    let b0 = first(barrier);
    for (const d of unfenced) b0 = g.add(b0, first(d));
    unfenced = [];
    const zero = g.mul(b0, g.constF32([0], [1]));
    let nan: Value | null = null;
    const isNan = () => (nan ??= g.node('IsNaN', [b0], [{ dtype: 'bool', shape: [1] }])[0]!);
    const fenced = new Map<string, Value>();
    const inputOf = (name: string): Value | null => {
      if (name === '') return null;
      if (inSeg.has(name)) return g.value(remap.get(name)!);
      const v = g.value(name);
      // Constants stay as they are. Everything else from outside is fenced, graph inputs and non-float values too:
      // a recomputed chain that starts only from inputs (a dropout mask unpacked from its fed bits) would otherwise
      // run whenever ORT likes, e.g. at the start of the step, and every layer's copy would wait there for its use.
      if (g.initializers.has(name)) return v;
      let f = fenced.get(name);
      if (!f) {
        f = v.dtype === 'float32' ? g.add(v, zero) : g.node('Where', [isNan(), v, v], [{ dtype: v.dtype, shape: [...v.shape] }])[0]!;
        fenced.set(name, f);
      }
      return f;
    };
    for (const i of members) {
      const n = forward[i]!;
      const outs = n.outputs.map((o) => ({ dtype: g.value(o).dtype, shape: [...g.value(o).shape] }));
      const copies = g.node(n.op, n.inputs.map(inputOf), outs, { ...n.attrs }, { domain: n.domain });
      n.outputs.forEach((o, k) => remap.set(o, copies[k]!.name));
    }
  };

  g.withScope('grad', () => {
    for (const i of active) {
      const node = forward[i]!;
      const rule = RULES[node.op];
      const dys = node.outputs.map((o) => takeGrad(o));
      if (dys.every((d) => d === null)) continue;
      if (!rule) g.fail(`no gradient rule for op ${node.domain ? node.domain + '.' : ''}${node.op} (node ${node.name}); add one to RULES in autodiff.ts, or registerRule it beside the op's forward`);
      const seg = segOf(i);
      if (seg && !recomputed.has(seg)) recompute(seg, dys.find((d) => d !== null)!);
      const val = (name: string) => g.value(seg ? (remap.get(name) ?? name) : name);
      const ctx: RuleContext = {
        g,
        node,
        x: (k) => val(node.inputs[k]!),
        y: (k) => val(node.outputs[k]!),
        dy: (k) => dys[k] ?? null,
        needs: (k) => k < node.inputs.length && reach.has(node.inputs[k]!) && dep.has(node.inputs[k]!),
        attrInt: (name, def) => {
          const a = node.attrs[name];
          return a && a.kind === 'int' ? a.value : def;
        },
        constInts: (k) => {
          const init = g.initializers.get(node.inputs[k]!);
          if (!init?.raw || init.dtype !== 'int64') g.fail(`${node.op} ${node.name}: input ${k} must be an int64 constant`);
          const copy = new Uint8Array(init.raw);
          return [...new BigInt64Array(copy.buffer)].map(Number);
        },
        feed,
        opts,
      };
      const grads = g.withScope(node.op, () => rule(ctx));
      grads.forEach((d, k) => {
        if (d && ctx.needs(k)) pushGrad(node.inputs[k]!, d);
      });
    }
  });

  const grads = new Map<string, Value>();
  for (const w of wrt) {
    const d = takeGrad(w.name);
    if (!d) throw new EdgeloraError(`no gradient reached ${w.name}`, { where: 'autodiff' });
    grads.set(w.name, g.output(d, (opts.gradName ?? ((n) => `grad.${n}`))(w.name)));
  }
  return { grads, runtimeFeeds, nodesAdded: g.nodes.length - before };
}
