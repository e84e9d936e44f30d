// cxr service worker: the first visit caches the page, the runtime (vendor/) and the model's ONNX artefacts,
// so the page opens and reads films with no network. Page files: network first (a new version is seen at
// once online), the cache when offline. The model and the runtime: cache first (megabytes; the cache is
// renewed when /offline/model.json names another graph). Never cached: /api/ (a patient's results).
"use strict";

const CACHE = "cxr-offline-v1";
const PAGE = ["/", "/manifest.webmanifest", "/static/app.css", "/static/app.js", "/static/capture.js",
  "/static/imaging.js", "/static/finder.js", "/static/stability.js",
  "/static/ondevice.js", "/static/dicom.js", "/static/favicon.svg",
  "/static/icon-192.png", "/static/icon-512.png", "/offline/model.json"];
const HEAVY = ["/static/vendor/ort.wasm.min.js", "/static/vendor/ort-wasm-simd-threaded.mjs",
  "/static/vendor/ort-wasm-simd-threaded.wasm", "/static/vendor/dicomParser.min.js", "/offline/model.onnx"];
const CARD = "/api/v1/model";  // the model card, public and the same for everyone: shown offline too

self.addEventListener("install", (event) => {
  event.waitUntil((async () => {
    const cache = await caches.open(CACHE);
    await cache.addAll(PAGE.concat([CARD]));
    const model = await (await cache.match("/offline/model.json")).json();
    // A model the device cannot read: cache the page anyway; the page stays in server mode.
    await cache.addAll(model.available ? HEAVY : HEAVY.slice(0, -1));
    await self.skipWaiting();
  })());
});

self.addEventListener("activate", (event) => {
  event.waitUntil((async () => {
    for (const name of await caches.keys()) if (name !== CACHE) await caches.delete(name);
    await self.clients.claim();
  })());
});

async function networkFirst(request) {
  const cache = await caches.open(CACHE);
  try {
    const response = await fetch(request);
    if (response.ok) await cache.put(request, response.clone());
    return response;
  } catch (err) {
    const hit = await cache.match(request, { ignoreSearch: true });
    if (hit) return hit;
    throw err;
  }
}

async function cacheFirst(request) {
  const cache = await caches.open(CACHE);
  const hit = await cache.match(request);
  if (hit) return hit;
  const response = await fetch(request);
  if (response.ok) await cache.put(request, response.clone());
  return response;
}

self.addEventListener("fetch", (event) => {
  const url = new URL(event.request.url);
  if (event.request.method !== "GET" || url.origin !== self.location.origin) return;
  if (url.pathname === CARD) { event.respondWith(networkFirst(event.request)); return; }
  if (url.pathname.startsWith("/api/")) return;
  if (HEAVY.includes(url.pathname)) { event.respondWith(cacheFirst(event.request)); return; }
  event.respondWith(networkFirst(event.request));
});
