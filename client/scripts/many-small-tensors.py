# Saves step 1 of JOB through ckptd's HTTP API: one rank holding N whole u8 tensors of SIZE
# random bytes, one chunk each (the shape of a rank's norms and biases, many and small).
#   python3 client/scripts/many-small-tensors.py JOB N SIZE   (needs the blake3 module; ckptd at SERVER)
import json, os, sys, urllib.request, blake3
base = os.environ.get("SERVER", "http://127.0.0.1:7070")
job, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def req(method, path, body=b""):
    r = urllib.request.Request(base + path, data=body, method=method)
    with urllib.request.urlopen(r) as resp:
        return resp.read()
req("PUT", f"/v1/jobs/{job}/saves/1", json.dumps({"world_size": 1}).encode())
tensors = []
for i in range(n):
    data = os.urandom(size)
    h = blake3.blake3(data).hexdigest()
    req("PUT", f"/v1/jobs/{job}/chunks/{h}", data)
    tensors.append({"name": f"layers.{i}.norm", "dtype": "u8", "shape": [size], "global_shape": [size], "offsets": [0], "chunks": [{"hash": h, "len": size}]})
req("PUT", f"/v1/jobs/{job}/saves/1/ranks/0", json.dumps({"rank": 0, "tensors": tensors, "metadata": None}).encode())
print("saved", n, "tensors")
