// Stop strings over streamed text: text that could still be the start of a stop string is held
// back, so a client never receives the beginning of a stop sequence it asked not to see.
export class StopMatcher {
  private held = '';
  private done = false;
  constructor(private readonly stops: readonly string[]) {}

  /** Adds decoded text; returns what may be sent now and whether a stop string was reached. */
  push(text: string): { emit: string; stopped: boolean } {
    if (this.done) return { emit: '', stopped: true };
    const buf = this.held + text;
    let cut = -1;
    for (const s of this.stops) {
      const i = buf.indexOf(s);
      if (i >= 0 && (cut < 0 || i < cut)) cut = i;
    }
    if (cut >= 0) {
      this.done = true;
      this.held = '';
      return { emit: buf.slice(0, cut), stopped: true };
    }
    // Hold back the longest suffix of buf that is a proper prefix of some stop string.
    let keep = 0;
    for (const s of this.stops) {
      for (let n = Math.min(s.length - 1, buf.length); n > keep; n--) {
        if (buf.endsWith(s.slice(0, n))) {
          keep = n;
          break;
        }
      }
    }
    this.held = buf.slice(buf.length - keep);
    return { emit: buf.slice(0, buf.length - keep), stopped: false };
  }

  /** The held-back text, at the end of generation. */
  flush(): string {
    const out = this.held;
    this.held = '';
    return out;
  }
}
