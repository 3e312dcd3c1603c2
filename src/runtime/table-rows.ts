// The token lookup of an inference graph over a quantized vocabulary table (src/model/llama.ts, fedTableRows):
// each distinct token's stored row (codes and scales) is read from model.onnx.data with a positioned read and
// fed to the graph, which dequantizes it with the same kernel that gathers from the table. Reading a row is
// I/O, not arithmetic: the codes stay as stored, so the graph computes what a lookup inside it would.
import ort from 'onnxruntime-node';
import { openSync, readSync, closeSync } from 'node:fs';
import path from 'node:path';
import { INPUT } from '../model/llama.js';
import { QuantizedWeights, WEIGHT_SUFFIX } from '../model/weights.js';
import type { Manifest } from '../model/manifest.js';
import { EdgeloraError } from '../util/errors.js';

export class TableRowReader {
  private fd: number | null;

  private constructor(
    private readonly file: string,
    fd: number,
    private readonly codes: { offset: number; rowBytes: number; kb: number; blob: number },
    private readonly scales: { offset: number; rowBytes: number },
    readonly vocab: number,
  ) {
    this.fd = fd;
  }

  /** The reader of `dir`'s embedding table, or null when the table is float (the graph gathers it itself). */
  static async open(dir: string, manifest: Manifest): Promise<TableRowReader | null> {
    if ((manifest.quant.embeddings ?? 'float') === 'float') return null;
    const qw = await QuantizedWeights.open(dir, manifest);
    const name = 'model.embed_tokens.weight';
    const packed = qw.tensors.get(name + WEIGHT_SUFFIX.table);
    const scales = qw.tensors.get(name + WEIGHT_SUFFIX.tableScales);
    if (!packed?.external || !scales?.external || !qw.dataFile) {
      throw new EdgeloraError(`the quantized table ${name} is not stored in the data file`, { where: dir, hint: 're-run `edgelora quantize`' });
    }
    const [V, kb, blob] = packed.shape as [number, number, number];
    const file = path.join(dir, qw.dataFile);
    return new TableRowReader(
      file,
      openSync(file, 'r'),
      { offset: packed.external.offset, rowBytes: kb * blob, kb, blob },
      { offset: scales.external.offset, rowBytes: kb * 4 },
      V,
    );
  }

  /** The feeds for `ids` (B rows of T tokens): each distinct token's row once, and where each token's row is. */
  feeds(ids: readonly (readonly number[])[]): Record<string, ort.Tensor> {
    if (this.fd === null) throw new EdgeloraError('the table reader is closed', { where: this.file });
    const B = ids.length;
    const T = ids[0]?.length ?? 0;
    const slot = new Map<number, number>();
    const index = new BigInt64Array(B * T);
    for (let b = 0; b < B; b++) {
      for (let t = 0; t < T; t++) {
        const id = ids[b]![t]!;
        if (!Number.isInteger(id) || id < 0 || id >= this.vocab) throw new EdgeloraError(`token id ${id} is outside the vocabulary (0..${this.vocab - 1})`);
        let s = slot.get(id);
        if (s === undefined) slot.set(id, (s = slot.size));
        index[b * T + t] = BigInt(s);
      }
    }
    const U = slot.size;
    const codes = new Uint8Array(U * this.codes.rowBytes);
    const scales = new Uint8Array(U * this.scales.rowBytes);
    for (const [id, s] of slot) {
      this.read(codes, s * this.codes.rowBytes, this.codes.rowBytes, this.codes.offset + id * this.codes.rowBytes);
      this.read(scales, s * this.scales.rowBytes, this.scales.rowBytes, this.scales.offset + id * this.scales.rowBytes);
    }
    return {
      [INPUT.tokenRows]: new ort.Tensor('uint8', codes, [U, this.codes.kb, this.codes.blob]),
      [INPUT.tokenRowScales]: new ort.Tensor('float32', new Float32Array(scales.buffer, 0, U * this.codes.kb), [U, this.codes.kb, 1]),
      [INPUT.tokenRowIndex]: new ort.Tensor('int64', index, [B, T]),
    };
  }

  private read(into: Uint8Array, at: number, length: number, position: number): void {
    let done = 0;
    while (done < length) {
      const n = readSync(this.fd!, into, at + done, length - done, position + done);
      if (n === 0) throw new EdgeloraError(`${this.file} ends before the table row at byte ${position}`, { hint: 're-run `edgelora quantize`; the file is truncated' });
      done += n;
    }
  }

  close(): void {
    if (this.fd !== null) closeSync(this.fd);
    this.fd = null;
  }
}
