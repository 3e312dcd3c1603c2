// A fixed-size bit set over chunk (or segment) indices, LSB-first within each byte, as carried in
// `missing` requests and upload acks (base64 of ceil(n / 8) bytes).
export class Bitmap {
  readonly bytes: Uint8Array;
  constructor(readonly size: number, bytes?: Uint8Array) {
    this.bytes = bytes ?? new Uint8Array(Math.ceil(size / 8));
  }
  static full(size: number): Bitmap {
    const b = new Bitmap(size);
    for (let i = 0; i < size; i++) b.set(i);
    return b;
  }
  /** Decodes base64; null when the length does not match `size` or bits past `size` are set. */
  static fromBase64(size: number, b64: string): Bitmap | null {
    const bytes = Buffer.from(b64, 'base64');
    if (bytes.length !== Math.ceil(size / 8)) return null;
    const bm = new Bitmap(size, new Uint8Array(bytes));
    for (let i = size; i < bytes.length * 8; i++) if (bm.get(i)) return null;
    return bm;
  }
  get(i: number): boolean {
    return ((this.bytes[i >> 3] ?? 0) & (1 << (i & 7))) !== 0;
  }
  set(i: number, on = true): void {
    const j = i >> 3;
    const cur = this.bytes[j] ?? 0;
    this.bytes[j] = on ? cur | (1 << (i & 7)) : cur & ~(1 << (i & 7));
  }
  /** The first set bit at or after `from`, or -1. */
  next(from = 0): number {
    for (let i = from; i < this.size; i++) {
      // Skip whole empty bytes: repair bitmaps are mostly zero.
      if ((i & 7) === 0 && (this.bytes[i >> 3] ?? 0) === 0) {
        i += 7;
        continue;
      }
      if (this.get(i)) return i;
    }
    return -1;
  }
  count(): number {
    let c = 0;
    for (let i = 0; i < this.size; i++) if (this.get(i)) c++;
    return c;
  }
  /** Sets every bit set in `other` (same size). */
  or(other: Bitmap): void {
    for (let j = 0; j < this.bytes.length; j++) this.bytes[j] = (this.bytes[j] ?? 0) | (other.bytes[j] ?? 0);
  }
  /** The bits NOT set, as a new bitmap (e.g. "missing" from "have"). */
  complement(): Bitmap {
    const b = new Bitmap(this.size);
    for (let i = 0; i < this.size; i++) if (!this.get(i)) b.set(i);
    return b;
  }
  indices(): number[] {
    const out: number[] = [];
    for (let i = 0; i < this.size; i++) if (this.get(i)) out.push(i);
    return out;
  }
  toBase64(): string {
    return Buffer.from(this.bytes).toString('base64');
  }
}
