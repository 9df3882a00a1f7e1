"""The page at `/`: chat with one side network, or send one prompt to several and read the answers side by side.

Plain HTML and JavaScript (no build step, nothing fetched from elsewhere):
it lists `GET /v1/models`, streams `POST /v1/chat/completions` (SSE) into
one column per chosen model, and keeps an API key, if the server needs one,
in the browser's local storage.
"""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>qst-serve</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body{font-family:system-ui,sans-serif;margin:1.2rem;max-width:1200px}
 h1{font-size:1.3rem;margin:0 0 .3rem} .hint{color:#555;font-size:.9rem;margin:.2rem 0 .8rem}
 #models label{margin-right:1rem;white-space:nowrap} textarea{width:100%;height:4.5rem;font:inherit}
 button{font:inherit;padding:.35rem .9rem;margin:.4rem .4rem .4rem 0} .cols{display:flex;gap:.8rem;flex-wrap:wrap}
 .col{flex:1 1 260px;border:1px solid #ccc;border-radius:6px;padding:.6rem;min-height:5rem;white-space:pre-wrap}
 .col h2{font-size:.95rem;margin:0 0 .4rem;color:#225} .turn{margin:.3rem 0} .user{color:#444}
 .err{color:#a00} #key{width:16rem}
</style></head><body>
<h1>qst-serve</h1>
<p class="hint">One frozen backbone serves every side network below in one pass per token. Tick one model to
chat with it, or several to send one prompt to all and compare the answers side by side.</p>
<div id="models">loading models...</div>
<p><label>API key (if the server asks) <input id="key" type="password"></label></p>
<textarea id="prompt" placeholder="Type a message, then Send (Ctrl+Enter)"></textarea><br>
<label>max tokens <input id="max" type="number" value="64" min="1" style="width:5rem"></label>
<label>temperature <input id="temp" type="number" value="0" min="0" max="2" step="0.1" style="width:4rem"></label>
<button id="send">Send</button><button id="clear">New conversation</button>
<div class="cols" id="out"></div>
<script>
const $ = (id) => document.getElementById(id);
const history = {};  // model -> [{role, content}]
$("key").value = localStorage.getItem("qst-key") || "";
$("key").onchange = () => localStorage.setItem("qst-key", $("key").value);
function headers() {
  const h = {"Content-Type": "application/json"};
  if ($("key").value) h["Authorization"] = "Bearer " + $("key").value;
  return h;
}
async function loadModels() {
  const r = await fetch("/v1/models", {headers: headers()});
  const body = await r.json();
  if (!r.ok) { $("models").innerHTML = '<span class="err">' + body.error.message + "</span>"; return; }
  $("models").innerHTML = "";
  body.data.forEach((m, i) => {
    const label = document.createElement("label");
    label.innerHTML = '<input type="checkbox" name="model" value="' + m.id + '"' + (i === 0 ? " checked" : "") +
      "> " + m.id + (m.parent ? "" : " (base)");
    $("models").appendChild(label);
  });
}
function chosen() { return [...document.querySelectorAll("input[name=model]:checked")].map((e) => e.value); }
function column(model) {
  let col = document.querySelector('.col[data-model="' + model + '"]');
  if (!col) {
    col = document.createElement("div"); col.className = "col"; col.dataset.model = model;
    col.innerHTML = "<h2>" + model + "</h2>"; $("out").appendChild(col);
  }
  return col;
}
async function ask(model, text) {
  const col = column(model);
  const msgs = (history[model] = history[model] || []);
  msgs.push({role: "user", content: text});
  const turn = document.createElement("div"); turn.className = "turn";
  turn.innerHTML = '<div class="user">&gt; ' + text.replace(/</g, "&lt;") + '</div><div class="answer"></div>';
  col.appendChild(turn);
  const answer = turn.querySelector(".answer");
  const body = {model, messages: msgs, stream: true, max_tokens: +$("max").value, temperature: +$("temp").value};
  const r = await fetch("/v1/chat/completions", {method: "POST", headers: headers(), body: JSON.stringify(body)});
  if (!r.ok) { const e = await r.json(); answer.innerHTML = '<span class="err">' + e.error.message + "</span>";
               msgs.pop(); return; }
  const reader = r.body.getReader(); const dec = new TextDecoder(); let buf = "", reply = "";
  for (;;) {
    const {value, done} = await reader.read(); if (done) break;
    buf += dec.decode(value, {stream: true});
    let cut; while ((cut = buf.indexOf("\\n\\n")) >= 0) {
      const line = buf.slice(0, cut).trim(); buf = buf.slice(cut + 2);
      if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
      const delta = JSON.parse(line.slice(6)).choices[0]?.delta?.content || "";
      reply += delta; answer.textContent = reply;
    }
  }
  answer.dataset.done = "1";
  msgs.push({role: "assistant", content: reply});
}
$("send").onclick = () => {
  const text = $("prompt").value.trim(); if (!text) return;
  const models = chosen(); if (!models.length) return;
  document.querySelectorAll(".col").forEach((c) => { if (!models.includes(c.dataset.model)) c.remove(); });
  models.forEach((m) => ask(m, text)); $("prompt").value = "";
};
$("prompt").onkeydown = (e) => { if (e.key === "Enter" && e.ctrlKey) $("send").click(); };
$("clear").onclick = () => { for (const k in history) delete history[k]; $("out").innerHTML = ""; };
loadModels();
</script></body></html>
"""
