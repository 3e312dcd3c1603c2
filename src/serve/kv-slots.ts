// The serving batch's KV cache: per layer one key and one value buffer [slots, G, capacity, D]. Row
// i of the running batch lives in slot i, so the first n slots are one contiguous [n, G, cap, D]
// view that a decode step feeds whole; a new row is prefilled straight into its slot (a [1, G, cap, D]
// view); a finished row's slot is refilled by moving the last row into it.
import type { ModelConfig } from '../formats/hf-config.js';

export class KvSlots {
  private keys: Float32Array[] = [];
  private values: Float32Array[] = [];
  private cap = 0;

  constructor(
    private readonly cfg: ModelConfig,
    /** Rows the batch holds at most. */
    readonly slots: number,
    /** Tokens a row may hold at most (prompt + completion). */
    readonly maxCapacity: number,
  ) {}

  get capacity(): number {
    return this.cap;
  }

  /** Bytes held by the buffers now. */
  get bytes(): number {
    return this.keys.reduce((a, k) => a + k.byteLength * 2, 0);
  }

  /**
   * Grows every buffer to hold `tokens` per row (doubling, up to maxCapacity), copying the first
   * `lengths.length` rows' cached tokens. Buffers only grow: decode steps keep constant shapes.
   */
  ensure(tokens: number, lengths: readonly number[]): void {
    if (tokens <= this.cap) return;
    const { numLayers, numKvHeads: G, headDim: D } = this.cfg;
    const cap = Math.min(this.maxCapacity, Math.max(tokens, this.cap * 2, 64));
    const grow = (old: Float32Array | undefined): Float32Array => {
      const fresh = new Float32Array(this.slots * G * cap * D);
      if (old) {
        lengths.forEach((len, b) => {
          for (let h = 0; h < G; h++) fresh.set(old.subarray((b * G + h) * this.cap * D, ((b * G + h) * this.cap + len) * D), (b * G + h) * cap * D);
        });
      }
      return fresh;
    };
    this.keys = Array.from({ length: numLayers }, (_, i) => grow(this.keys[i]));
    this.values = Array.from({ length: numLayers }, (_, i) => grow(this.values[i]));
    this.cap = cap;
  }

  /** Slots [from, from + n) as [n, G, capacity, D] views. */
  view(from: number, n: number): { capacity: number; keys: Float32Array[]; values: Float32Array[] } {
    const row = this.cfg.numKvHeads * this.cap * this.cfg.headDim;
    const sub = (x: Float32Array) => x.subarray(from * row, (from + n) * row);
    return { capacity: this.cap, keys: this.keys.map(sub), values: this.values.map(sub) };
  }

  /** Copies slot `from`'s first `length` tokens into slot `to`. */
  move(from: number, to: number, length: number): void {
    const { numKvHeads: G, headDim: D } = this.cfg;
    for (const buf of [...this.keys, ...this.values]) {
      for (let h = 0; h < G; h++) {
        const src = (from * G + h) * this.cap * D;
        buf.copyWithin((to * G + h) * this.cap * D, src, src + length * D);
      }
    }
  }
}
