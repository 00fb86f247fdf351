"""Session 12: where nf4compile's extra compile time goes, on the CPU (inductor backend, caches off): decode-step
compile of a Llama-shaped model, nf4compile vs bf16, Dynamo's phase timers; with --profile a cProfile of the nf4 one."""
import cProfile, io, os, pstats, sys, time
os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "0"; os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] = "0"
import torch
sys.path.insert(0, "bench")
import e2e
method = sys.argv[1]
layers = int(os.environ.get("LAYERS", "8"))
shapes = {"m": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=8,
                    num_key_value_heads=8, vocab_size=4096, max_position_embeddings=256)}
dev = torch.device("cpu")
model = e2e.build("m", method, shapes, dev)
prompt = torch.randint(3, 4096, (1, 16))
step = torch.compile(e2e.decode_step, fullgraph=True)
cache = e2e.new_cache(model, 32)
prof = cProfile.Profile() if "--profile" in sys.argv else None
t = time.perf_counter()
with torch.no_grad():
    if prof: prof.enable()
    e2e.generate(model, prompt, 3, step, cache)
    if prof: prof.disable()
print(method, "layers", layers, "warm-up s", round(time.perf_counter() - t, 2), {k: round(v, 2) for k, v in e2e.compile_phases().items()})
if prof:
    prof.dump_stats(os.environ.get("PROF_OUT", "/tmp/compile.prof"))
