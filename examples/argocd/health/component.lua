-- Argo CD health of a clusterregistry.io/v1alpha1 Component: a CNF's images, preloaded before it deploys.
-- Ready=True is Healthy; Stalled=True (an invalid image, a chart that cannot render) and an image whose
-- copy failed are Degraded; anything else (copying, deferred by GC's window) is Progressing. Put the CNF
-- in a later sync wave than its Component so Argo CD waits for Healthy.
local hs = {status = "Progressing", message = "Waiting for the component reconciler"}
if obj.status == nil then
  return hs
end
if obj.status.observedGeneration ~= nil and obj.metadata.generation ~= nil
    and obj.status.observedGeneration < obj.metadata.generation then
  hs.message = "Waiting for the component reconciler to observe the new spec"
  return hs
end
local ready, stalled = nil, nil
for _, c in ipairs(obj.status.conditions or {}) do
  if c.type == "Ready" then ready = c end
  if c.type == "Stalled" and c.status == "True" then stalled = c end
end
if ready == nil then
  return hs
end
hs.message = ready.message or ready.reason or ""
if ready.status == "True" then
  hs.status = "Healthy"
elseif stalled ~= nil or ready.reason == "ArtifactFailed" then
  hs.status = "Degraded"
end
return hs
